"""The `triton` backend of the LSTM recurrence (recurrence.py). Importing this package does not
import Triton; importing recurrence.py does."""
