"""Training a language model with teacher forcing and truncated backpropagation through time.

`train(TrainConfig(...))` is what `fastlstm train` runs: it reads a text (or the built-in corpus),
builds a tokenizer and an LSTMLanguageModel, and trains on contiguous batches, carrying the LSTM
state (detached) from one batch to the next. Checkpoints hold everything needed to continue
exactly where a run stopped (model, optimizer, step, carried state, random states, loss history),
and are written atomically. Under `torchrun` it trains with DistributedDataParallel (gloo on the
CPU, nccl on CUDA), each process taking its own rows of every batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import data as lm_data
from .model import LSTMLanguageModel
from .tokenizers import CharTokenizer, WordTokenizer, tokenizer_from_dict

CHECKPOINT_NAME = "checkpoint.pt"
TOKENIZER_NAME = "tokenizer.json"
PLOT_NAME = "loss.png"
HISTORY_NAME = "history.json"


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (the `fastlstm train` options)."""
    text: Optional[str] = None          # a UTF-8 text file; None: the built-in corpus
    out_dir: str = "fastlstm-run"       # checkpoint, tokenizer, loss curve
    level: str = "char"                 # char | word
    max_vocab: Optional[int] = None     # word level: vocabulary limit (specials included)
    min_freq: int = 1                   # word level: rarer words become <unk>
    val_fraction: float = 0.1           # the last fraction of the text is held out
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False
    weight_drop: float = 0.0            # fastlstm.LSTM's AWD-LSTM regularizers (0: off)
    locked_dropout: float = 0.0
    zoneout: Union[float, Tuple[float, float]] = 0.0  # z, or (z_h, z_c)
    batch_size: int = 32                # rows per process
    seq_len: int = 128                  # truncated BPTT length
    steps: int = 1000                   # optimizer steps in total (a resumed run continues to it)
    max_minutes: Optional[float] = None  # stop early after this much training time
    optimizer: str = "adamw"            # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 0.01
    momentum: float = 0.9               # sgd only
    clip: float = 1.0                   # max gradient norm; 0 disables
    schedule: str = "cosine"            # cosine | constant (both after a linear warmup)
    warmup: int = 50
    min_lr_ratio: float = 0.1
    eval_interval: int = 200            # steps between validations and checkpoints
    eval_batches: int = 50              # validation batches per evaluation (0: the whole split)
    log_interval: int = 20              # steps between progress lines when stdout is not a tty
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: str = "auto"                   # auto (bf16 autocast on CUDA) | bf16 | off
    resume: bool = False                # continue from out_dir/checkpoint.pt if it exists
    plot: bool = True
    backend: str = "auto"               # fastlstm.LSTM backend

    def validate(self) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name in ("embed_dim", "hidden_size", "num_layers", "batch_size", "seq_len", "steps",
                     "eval_interval", "log_interval", "min_freq"):
            positive_int(name)
        if self.level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word'; got {self.level!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd'; got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant'; got {self.schedule!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off'; got {self.amp!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if self.clip < 0 or self.warmup < 0 or self.eval_batches < 0:
            raise ValueError("clip, warmup and eval_batches must be >= 0")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0; got {self.max_minutes!r}")


# ------------------------------------------------------------------------------------------------
# Distributed setup
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_request: str) -> tuple[_Dist, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_request == "auto":
        device_request = "cuda" if torch.cuda.is_available() else "cpu"
    use_cuda = torch.device(device_request).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device_request!r} was asked for but CUDA is not available")
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist(), torch.device(device_request)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return _Dist(rank, world, local_rank, owns), device


def _all_gather_tensor(tensor: torch.Tensor, dim: int, dist_info: _Dist) -> torch.Tensor:
    if not dist_info.enabled:
        return tensor
    import torch.distributed as dist
    parts = [torch.empty_like(tensor) for _ in range(dist_info.world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim)


def _all_gather_object(value, dist_info: _Dist) -> list:
    if not dist_info.enabled:
        return [value]
    import torch.distributed as dist
    parts = [None] * dist_info.world
    dist.all_gather_object(parts, value)
    return parts


# ------------------------------------------------------------------------------------------------
# Pieces of the loop
# ------------------------------------------------------------------------------------------------

def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Weight decay on matrices only: decaying biases and embeddings gains nothing and hurts a bit.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def sequence_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state,
                  autocast_dtype=None):
    """Mean cross-entropy of next-token prediction over a [B, T] batch, and the new state."""
    context = (torch.autocast(inputs.device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else contextlib.nullcontext())
    with context:
        logits, state = model(inputs, state)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, state


def _detach(state):
    return None if state is None else tuple(s.detach() for s in state)


@torch.no_grad()
def evaluate(model: nn.Module, batches: lm_data.ContiguousBatches, max_batches: int,
             dist_info: _Dist, device, autocast_dtype=None) -> float:
    """Mean validation loss (nats per token) over the first `max_batches` batches (0: all)."""
    was_training = model.training
    model.eval()
    count = len(batches) if max_batches == 0 else min(max_batches, len(batches))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    state = None
    for index in range(count):
        inputs, targets = batches.batch(index)
        loss, state = sequence_loss(model, inputs.to(device), targets.to(device), state,
                                    autocast_dtype)
        total[0] += loss.double() * targets.numel()
        total[1] += targets.numel()
    if dist_info.enabled:
        import torch.distributed as dist
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


class Progress:
    """One status line: redrawn in place on a terminal, a plain line every few steps otherwise."""

    def __init__(self, total: int, stream=None, every: int = 20, enabled: bool = True):
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.every = max(1, every)
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False

    def update(self, step: int, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        width = len(str(self.total))
        fraction = step / max(1, self.total)
        if self.tty:
            filled = int(20 * fraction)
            bar = "#" * filled + "." * (20 - filled)
            self.stream.write(f"\r[{bar}] {step:>{width}}/{self.total} {text}\x1b[K")
            self.stream.flush()
            self._open = True
        elif force or step % self.every == 0 or step == self.total:
            self.stream.write(f"step {step:>{width}}/{self.total} ({100 * fraction:5.1f}%) {text}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open and self.enabled:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _atomic_torch_save(payload, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def plot_history(history: dict, path: str) -> Optional[str]:
    """Write the loss curve to `path` (PNG); returns None, or why it could not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed, so no loss curve was drawn; "
                "`pip install matplotlib` (or the fastlstm[bench] extra) to get one")
    figure, axis = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"])
        axis.plot(steps, losses, label="train", linewidth=1)
    if history["val"]:
        steps, losses = zip(*history["val"])
        axis.plot(steps, losses, "o-", label="validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return None


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by `train` (a dict; see `train` for its keys)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except TypeError:  # torch without weights_only
        return torch.load(path, map_location=map_location)


def model_from_checkpoint(checkpoint: dict, device="cpu", backend: str = "auto"):
    """(model in eval mode on `device`, tokenizer) from a checkpoint dict or path."""
    if isinstance(checkpoint, str):
        checkpoint = load_checkpoint(checkpoint)
    model = LSTMLanguageModel(**checkpoint["model_config"], backend=backend)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return model, tokenizer_from_dict(checkpoint["tokenizer"])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def _prepare_data(config: TrainConfig, tokenizer_payload: Optional[dict]):
    if config.text is None:
        text, description = lm_data.builtin_corpus()
    else:
        text, description = lm_data.read_text(config.text), config.text
    train_text, val_text = lm_data.split_text(text, config.val_fraction)
    if tokenizer_payload is not None:
        tokenizer = tokenizer_from_dict(tokenizer_payload)
    elif config.level == "char":
        tokenizer = CharTokenizer.from_text(text)
    else:
        tokenizer = WordTokenizer.from_text(train_text, max_vocab=config.max_vocab,
                                            min_freq=config.min_freq)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.int64)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.int64)
    return tokenizer, train_ids, val_ids, description


def train(config: TrainConfig, model: Optional[nn.Module] = None, stream=None,
          verbose: bool = True) -> dict:
    """Train as `config` says; returns a summary dict (final losses, steps, paths, timings).

    `model` (optional) replaces the LSTMLanguageModel built from the config: any module with the
    same forward(ids, state) -> (logits, state) contract, e.g. one built on nn.LSTM for a
    side-by-side comparison. Checkpoint keys: model, model_config, optimizer, step, tokenizer,
    train_config, state (the carried (h, c) of every batch row), rng, history, data_fingerprint.
    """
    config.validate()
    dist_info, device = _setup_distributed(config.device)
    try:
        return _train(config, model, stream, verbose, dist_info, device)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config, model, stream, verbose, dist_info, device):
    main = dist_info.main
    os.makedirs(config.out_dir, exist_ok=True)
    checkpoint_path = os.path.join(config.out_dir, CHECKPOINT_NAME)
    checkpoint = None
    if config.resume and os.path.exists(checkpoint_path):
        checkpoint = load_checkpoint(checkpoint_path)

    tokenizer, train_ids, val_ids, description = _prepare_data(
        config, checkpoint["tokenizer"] if checkpoint else None)
    fingerprint = lm_data.fingerprint(train_ids)
    if checkpoint is not None and checkpoint["data_fingerprint"] != fingerprint:
        raise RuntimeError(f"--resume: {checkpoint_path} was trained on other data (fingerprint "
                           f"{checkpoint['data_fingerprint']}, this text gives {fingerprint}); "
                           f"pass the same --text or start a new --out-dir")

    rows = slice(dist_info.rank * config.batch_size, (dist_info.rank + 1) * config.batch_size)
    train_batches = lm_data.ContiguousBatches(train_ids, config.batch_size * dist_info.world,
                                              config.seq_len, rows)
    val_batches = None
    if val_ids.numel() > 1:
        val_rows = max(1, min(config.batch_size * dist_info.world,
                              (val_ids.numel() - 1) // config.seq_len))
        if val_rows % dist_info.world:
            val_rows = max(dist_info.world, val_rows - val_rows % dist_info.world)
        per_rank = val_rows // dist_info.world
        try:
            val_batches = lm_data.ContiguousBatches(
                val_ids, val_rows, config.seq_len,
                slice(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank))
        except ValueError:
            val_batches = None  # too little held-out text for one batch

    if model is None:
        model_config = {"vocab_size": tokenizer.vocab_size, "embed_dim": config.embed_dim,
                        "hidden_size": config.hidden_size, "num_layers": config.num_layers,
                        "dropout": config.dropout, "tie_weights": config.tie_weights}
        for name in ("weight_drop", "locked_dropout", "zoneout"):
            value = getattr(config, name)
            if value not in (0.0, (0.0, 0.0)):
                model_config[name] = value
        if checkpoint is not None:
            model_config = checkpoint["model_config"]
        torch.manual_seed(config.seed)  # the same initial weights on every process
        model = LSTMLanguageModel(**model_config, backend=config.backend)
    else:
        model_config = model.config() if hasattr(model, "config") else {}
    model.to(device)
    optimizer = make_optimizer(config, model)
    step = 0
    history = {"train": [], "val": []}
    state = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        history = checkpoint["history"]
        if checkpoint["state"] is not None:
            h_all, c_all = checkpoint["state"]
            if h_all.shape[1] != config.batch_size * dist_info.world:
                raise RuntimeError(
                    f"--resume: the checkpoint carries state for {h_all.shape[1]} batch rows but "
                    f"this run has {config.batch_size * dist_info.world} (batch size x processes); "
                    f"resume with the same batch size and number of processes")
            state = (h_all[:, rows].to(device), c_all[:, rows].to(device))
        rng = checkpoint["rng"]
        if len(rng) != dist_info.world:
            raise RuntimeError(f"--resume: the checkpoint was written by {len(rng)} processes, "
                               f"this run has {dist_info.world}")
        _set_rng_state(rng[dist_info.rank], device)
    else:
        torch.manual_seed(config.seed + dist_info.rank)  # dropout differs between processes

    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    use_bf16 = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if use_bf16 else None

    progress = Progress(config.steps, stream, config.log_interval, enabled=verbose and main)
    if checkpoint is None:
        progress.message(
            f"fastlstm train: {description}; {config.level} level, vocabulary "
            f"{tokenizer.vocab_size}, {train_ids.numel():,} training and {val_ids.numel():,} "
            f"validation tokens; {sum(p.numel() for p in model.parameters()):,} parameters on "
            f"{device}" + (f" x {dist_info.world} processes" if dist_info.enabled else "")
            + (", bf16 autocast" if use_bf16 else ""))
    else:
        progress.message(f"fastlstm train: resuming {checkpoint_path} at step {step}")

    def save_checkpoint():
        h_c = None
        if state is not None:
            h_c = (_all_gather_tensor(state[0], 1, dist_info).cpu(),
                   _all_gather_tensor(state[1], 1, dist_info).cpu())
        rng = _all_gather_object(_rng_state(device), dist_info)
        if not main:
            return
        payload = {
            "model": model.state_dict(), "model_config": model_config,
            "optimizer": optimizer.state_dict(), "step": step,
            "tokenizer": tokenizer.to_dict(), "train_config": dataclasses.asdict(config),
            "state": h_c, "rng": rng, "history": history, "data_fingerprint": fingerprint,
        }
        _atomic_torch_save(payload, checkpoint_path)
        tokenizer.save(os.path.join(config.out_dir, TOKENIZER_NAME))
        with open(os.path.join(config.out_dir, HISTORY_NAME), "w") as handle:
            json.dump(history, handle)
        if config.plot:
            reason = plot_history(history, os.path.join(config.out_dir, PLOT_NAME))
            if reason is not None and not getattr(save_checkpoint, "warned", False):
                progress.message(f"note: {reason}")
                save_checkpoint.warned = True

    def validate():
        if val_batches is None:
            return None
        loss = evaluate(model, val_batches, config.eval_batches, dist_info, device, autocast_dtype)
        history["val"].append((step, loss))
        progress.message(f"step {step}: validation loss {loss:.4f} nats/token, perplexity "
                         f"{math.exp(min(loss, 50)):.2f}")
        return loss

    model.train()
    train_seconds = 0.0
    tokens_per_step = config.batch_size * config.seq_len * dist_info.world
    window_start, window_tokens = time.perf_counter(), 0
    last_loss = float("nan")
    stop_reason = "steps"
    while step < config.steps:
        started = time.perf_counter()
        if step % len(train_batches) == 0:
            state = None  # a new pass over the text starts from a zero state
        inputs, targets = train_batches.batch(step)
        inputs, targets = inputs.to(device), targets.to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss, state = sequence_loss(wrapped, inputs, targets, state, autocast_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        state = _detach(state)
        step += 1
        last_loss = loss.item()  # a sync per step: needed for the display and the history
        train_seconds += time.perf_counter() - started
        history["train"].append((step, last_loss))
        window_tokens += tokens_per_step
        elapsed = time.perf_counter() - window_start
        progress.update(step, f"loss {last_loss:.4f} | {window_tokens / max(elapsed, 1e-9):,.0f} "
                              f"tok/s | lr {optimizer.param_groups[0]['lr']:.2e}")
        if elapsed > 5:
            window_start, window_tokens = time.perf_counter(), 0
        out_of_time = (config.max_minutes is not None
                       and train_seconds >= config.max_minutes * 60)
        if dist_info.enabled and config.max_minutes is not None:
            # every process must stop at the same step, or the collectives would hang
            import torch.distributed as dist
            flag = torch.tensor([1.0 if out_of_time else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if step % config.eval_interval == 0 or step == config.steps or out_of_time:
            validate()
            save_checkpoint()
        if out_of_time:
            stop_reason = "time"
            break
    progress.close()
    val_loss = history["val"][-1][1] if history["val"] else None
    return {"step": step, "train_loss": last_loss, "val_loss": val_loss,
            "train_seconds": train_seconds, "stop_reason": stop_reason,
            "checkpoint": checkpoint_path, "out_dir": config.out_dir,
            "vocab_size": tokenizer.vocab_size, "tokens_per_step": tokens_per_step,
            "history": history}
