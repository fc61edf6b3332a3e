"""The copy warm-up: stages of synthetic episodes that teach a tiny model to copy from its context.

The agent copies from its context all the time (values into notes and answers, entity names
into queries, record ids into ``delete_ids``), and a tiny model trained on the task alone
copies nothing. Each stage trains one episode format for many small optimizer steps; at the
end the embedding rows of the tokens no stage fed are redrawn (:mod:`memact.warmup.embeddings`).
What each format and stage taught, measured, is in docs/pretrain.md.

Formats (``FORMATS``):

- ``mqar`` (multi-query associative recall): n (name, value) pairs, then the names again in
  shuffled order, each followed by its value.
- ``mqar_all``: the same with keys and values drawn from every single-token world word
  (names, values, record ids).
- ``idlist``: a head record and 1 to n short records, each under its ``[id: ...]`` header,
  then ``"delete_ids": [...]`` listing every record id but the head's.
- ``idlist_mqar``: ``idlist`` and ``mqar_all`` (4 pairs), half each.

Target kinds (``KIND_NAMES``) mark what an evaluation scores: ``recall`` (the value after a
key) and ``copy`` (a record id in ``delete_ids``); ``FRESH`` marks the unpredictable record
headers that ``loss="copy"`` skips.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KIND_NAMES = {1: "recall", 2: "note", 3: "copy"}
FRESH = -1
LOSSES = ("all", "targets", "copy")
FORMATS = ("mqar", "mqar_all", "idlist", "idlist_mqar")
Episode = tuple[list[int], list[int]]  # token ids, per token 0, FRESH or its kind of target
_POOLS: dict[int, list[int]] = {}


@functools.cache
def world_words() -> tuple[str, ...]:
    """Every single-token world word: names, values, record ids."""
    from memact.env.memory import ID_POOL
    from memact.env.task import ATTRIBUTES, NAME_POOL

    return tuple(NAME_POOL + [v for vs in ATTRIBUTES.values() for v in vs] + list(ID_POOL))


@functools.cache
def _non_id_words() -> tuple[str, ...]:
    from memact.env.memory import ID_POOL

    ids = set(ID_POOL)
    return tuple(w for w in world_words() if w not in ids)


def _world_token_ids(tok: Any) -> list[int]:
    """The token ids of :func:`world_words`, computed once per tokenizer."""
    if id(tok) not in _POOLS:
        _POOLS[id(tok)] = [tok.convert_tokens_to_ids(w) for w in world_words()]
    return _POOLS[id(tok)]


def recall_pairs(keys: list[int], vals: list[int], rng: random.Random) -> Episode:
    """The pairs in order, then every key again in shuffled order followed by its value (the target)."""
    n = len(keys)
    ids = [t for k, v in zip(keys, vals) for t in (k, v)]
    order = rng.sample(range(n), n)
    return ids + [t for i in order for t in (keys[i], vals[i])], [0] * 2 * n + [0, 1] * n


def episode(fmt: str, n: int, rng: random.Random, tok: Any) -> Episode:
    """One episode of format ``fmt`` (one of ``FORMATS``) with n pairs (mqar) or at most n
    records to list (idlist); ``tok`` has one token per entity name, value and record id."""
    from memact.env.task import ATTRIBUTES, NAME_POOL

    if fmt == "idlist_mqar":  # keeps the value and name copy of the mqar stages alive while ids are learned
        if rng.random() < 0.5:
            return _idlist(n, rng, tok)
        fmt, n = "mqar_all", 4
    if fmt == "idlist":
        return _idlist(n, rng, tok)
    if fmt == "mqar":
        names = rng.sample(NAME_POOL, n)
        keys = [tok.convert_tokens_to_ids(k) for k in names]
        vals = [tok.convert_tokens_to_ids(rng.choice(ATTRIBUTES[rng.choice(list(ATTRIBUTES))])) for _ in names]
        return recall_pairs(keys, vals, rng)
    if fmt == "mqar_all":
        picked = rng.sample(_world_token_ids(tok), 2 * n)
        return recall_pairs(picked[:n], picked[n:], rng)
    raise ValueError(f"unknown episode format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _idlist(n: int, rng: random.Random, tok: Any) -> Episode:
    """A head record, 1 to n short records, then the ``delete_ids`` list of every record but the head."""
    from memact.env.memory import ID_POOL
    from memact.env.tools import with_record_id

    words = _non_id_words()
    k = rng.randint(1, n)
    rids = rng.sample(ID_POOL, k + 1)
    text = "".join(with_record_id(r, " ".join(rng.sample(words, rng.randint(2, 6)))) + "\n" for r in rids)
    text += '"delete_ids": ['
    marks = []  # (char offset, record id) of each copied id
    for i, rid in enumerate(rids[1:]):
        text += '"' if i == 0 else ', "'
        marks.append((len(text), rid))
        text += rid + '"'
    text += "]"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    position = {start: p for p, (start, _) in enumerate(enc["offset_mapping"])}
    targets = []
    for char, rid in marks:
        pos = position.get(char)
        if pos is None or ids[pos] != tok.convert_tokens_to_ids(rid):
            raise ValueError(f"record id {rid!r} is not one token of its own in {text!r}: the warm-up needs "
                             "one token per record id (build the model with `memact new-model`)")
        targets.append(pos)
    tgt = [FRESH] * targets[0] + [0] * (len(ids) - targets[0])  # the headers are fresh random words and ids
    for pos in targets:
        tgt[pos] = 3
    return ids, tgt


def make_batch(fmt: str, n: int, rng: random.Random, tok: Any, rows: int, seq: int,
               make: Callable[[random.Random], Episode] | None = None):
    """``rows`` rows of ``seq`` tokens, each packed with whole ``fmt`` episodes separated by EOS.

    Returns (input ids [rows, seq], attention mask [rows, seq], target kinds [rows, seq]).
    ``make(rng)`` builds each episode instead of :func:`episode` (the probes in
    ``benchmarks/recall_probe.py``); ``fmt`` then only names it in errors.
    """
    import torch

    if make is None:
        def make(r: random.Random) -> Episode:
            r.random()  # one draw before each episode, as in the runs docs/pretrain.md measured: same batches
            return episode(fmt, n, r, tok)

    x = torch.full((rows, seq), tok.pad_token_id)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    target = torch.zeros(rows, seq, dtype=torch.long)
    for b in range(rows):
        ids: list[int] = []
        tg: list[int] = []
        while True:
            e, t = make(rng)
            if len(ids) + len(e) + 1 > seq:
                break
            ids += e + [tok.eos_token_id]
            tg += t + [0]
        if not ids:
            raise ValueError(f"a row of {seq} tokens is shorter than one {fmt} episode with n={n}; "
                             "raise the stage's seq_len")
        x[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
        target[b, :len(ids)] = torch.tensor(tg, dtype=torch.long)
    return x, mask, target


def copy_loss(model: Any, x: Any, mask: Any, kind: Any, loss: str = "all") -> Any:
    """Mean next-token cross-entropy of ``model`` on a :func:`make_batch` batch.

    ``loss``: ``all`` (every real token), ``targets`` (the target tokens only) or ``copy``
    (every real token but the ``FRESH`` ones); see :class:`Stage`.
    """
    import torch.nn.functional as F

    logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1), reduction="none")
    w = mask[:, 1:].reshape(-1).float()
    if loss == "targets":
        w = w * (kind[:, 1:].reshape(-1) > 0)
    elif loss == "copy":
        w = w * (kind[:, 1:].reshape(-1) >= 0)
    return (ce * w).sum() / w.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Stage:
    """One stage of the copy warm-up.

    Attributes:
        format: episode format, one of ``FORMATS``.
        steps: optimizer steps.
        n: pairs (mqar) or most records listed (idlist) per episode, see :func:`episode`.
        batch: rows per step.
        seq_len: tokens per row.
        lr: peak AdamW learning rate; each stage warms up over min(100, steps/10) steps, then
            decays by cosine to 10% of it.
        loss: ``all`` (next-token loss on every token) or ``targets`` (only on the target
            tokens: the fresh random words of an episode, such as a new record's id, are
            unpredictable, and training on them teaches "an id here is one not seen before",
            the opposite of the copy), or ``copy``: every token except the fresh record headers
            that open ``idlist`` episodes (marked ``FRESH``), so an ``idlist_mqar`` mix trains
            recall episodes on every token and id lists on their targets.
    """

    format: str
    steps: int
    n: int = 4
    batch: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    loss: str = "all"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"stage format {self.format!r} is not one of {', '.join(FORMATS)}")
        for name in ("steps", "n", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage {self.format}: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"stage {self.format}: lr must be > 0, got {self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"stage {self.format}: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


# The recipe measured end to end (docs/pretrain.md, "Third round" and "Fifth round"); an
# `idlist` stage is one to add, with the defaults below.
DEFAULT_STAGES = (
    Stage("mqar", 12_000, n=4, batch=4, seq_len=128),
    Stage("mqar_all", 3_000, n=4, batch=4, seq_len=128),
)
# What a `format:steps` item of --stages leaves out, per format (else Stage's defaults).
STAGE_DEFAULTS = {s.format: s for s in DEFAULT_STAGES + (Stage("idlist", 2_000, n=1, loss="targets"),)}


def parse_stages(text: str, scale: float = 1.0, lr: float | None = None) -> tuple[Stage, ...]:
    """``"mqar:12000,idlist:1000:1:4:128:targets"`` -> stages.

    Each item is ``format:steps``, ``format:steps:n:batch:seq_len`` or
    ``format:steps:n:batch:seq_len:loss``; what an item leaves out comes from
    ``STAGE_DEFAULTS`` (else from :class:`Stage`'s defaults). ``scale`` multiplies
    every stage's steps (at least 1 step each); ``lr`` replaces every stage's learning rate.
    """
    stages = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 5, 6):
            raise ValueError(f"stage {item!r}: write format:steps or format:steps:n:batch:seq_len[:loss]")
        fmt = parts[0]
        if fmt not in FORMATS:
            raise ValueError(f"stage {item!r}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        base = STAGE_DEFAULTS.get(fmt, Stage(fmt, 1))
        try:
            nums = [int(p) for p in parts[1:5]]
        except ValueError:
            raise ValueError(f"stage {item!r}: steps, n, batch and seq_len must be integers") from None
        if nums[0] < 1:
            raise ValueError(f"stage {item!r}: steps must be >= 1")
        n, batch, seq = nums[1:] if len(nums) == 4 else (base.n, base.batch, base.seq_len)
        loss = parts[5] if len(parts) == 6 else base.loss
        stages.append(Stage(fmt, max(1, round(nums[0] * scale)), n, batch, seq, lr or base.lr, loss))
    if not stages:
        raise ValueError(f"--stages {text!r} names no stage")
    return tuple(stages)


def stages_text(stages: tuple[Stage, ...]) -> str:
    return ",".join(f"{s.format}:{s.steps}:{s.n}:{s.batch}:{s.seq_len}:{s.loss}" for s in stages)


class CopyWarmup:
    """Runs the stages on a model in place; one JSON row per evaluation in ``curve``.

    Args:
        model: a causal LM, trained in fp32.
        tokenizer: one token per entity name, value and record id (``memact new-model``).
        stages: the recipe.
        eval_every: steps between evaluations (each stage also evaluates at its start and end).
        eval_rows: rows of the fixed evaluation batch of each format.
        seed: training data seed (evaluation batches use their own fixed seed).
        log: called with each printed line.

    Batches are built on the host and moved to the model's device, so the same run works on
    the CPU or a GPU (there the tiny models are bound by kernel launches, not arithmetic).
    """

    def __init__(self, model: Any, tokenizer: Any, stages: tuple[Stage, ...], eval_every: int = 500,
                 eval_rows: int = 32, seed: int = 0, log=print):
        import torch

        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        self.model, self.tok, self.stages = model, tokenizer, stages
        self.device = next(model.parameters()).device
        self.eval_every, self.log = eval_every, log
        self.rng = random.Random(seed)
        # One fixed evaluation batch per format, at that format's stage shape.
        self.eval_batches = {}
        for s in stages:
            if s.format not in self.eval_batches:
                self.eval_batches[s.format] = make_batch(s.format, s.n, random.Random(12_345), tokenizer,
                                                         eval_rows, s.seq_len)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=stages[0].lr, betas=(0.9, 0.98),
                                           weight_decay=0.01)
        self.curve: list[dict[str, Any]] = []
        self.step = 0
        self.tokens = 0
        self.train_s = 0.0
        # Which token ids the training batches fed (attended positions only).
        self.seen = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)

    @staticmethod
    def lr_at(stage: Stage, step: int) -> float:
        """The stage's lr at its step ``step``: linear warm-up, then cosine to 10%."""
        warm = max(1, min(100, stage.steps // 10))
        return stage.lr * min(1.0, (step + 1) / warm) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / stage.steps))))

    def evaluate(self, stage_index: int, losses: list[float]) -> dict[str, Any]:
        """Accuracy and NLL per kind of target on every format's fixed batch."""
        import torch
        import torch.nn.functional as F

        row: dict[str, Any] = {"stage": stage_index, "format": self.stages[stage_index].format, "step": self.step,
                               "tokens": self.tokens, "loss": round(sum(losses) / len(losses), 4) if losses else None,
                               "train_s": round(self.train_s, 1), "acc": {}, "nll": {}}
        self.model.eval()
        with torch.no_grad():
            for fmt, batch in self.eval_batches.items():
                x, m, kind = (t.to(self.device) for t in batch)
                logits = self.model(input_ids=x, attention_mask=m).logits[:, :-1].float()
                t, k = x[:, 1:], kind[:, 1:]
                hit = logits.argmax(-1) == t
                for code in sorted(set(k[k > 0].tolist())):
                    sel = k == code
                    key = f"{fmt}/{KIND_NAMES[code]}"
                    row["acc"][key] = round(hit[sel].float().mean().item(), 4)
                    row["nll"][key] = round(F.cross_entropy(logits[sel], t[sel]).item(), 4)
        self.model.train()
        self.curve.append(row)
        accs = " ".join(f"{k} {v:.3f}" for k, v in row["acc"].items())
        self.log(f"[pretrain] stage {stage_index + 1}/{len(self.stages)} {row['format']} step {self.step} "
                 f"tokens {self.tokens:,} loss {row['loss']} | held-out acc: {accs}")
        return row

    def run(self, on_eval=None) -> list[dict[str, Any]]:
        """Train every stage; ``on_eval(row)`` after each evaluation (e.g. to append to a log)."""
        import torch

        self.model.train()
        for si, stage in enumerate(self.stages):
            losses: list[float] = []
            if si == 0:  # later stages start where the previous one's last evaluation left off
                row = self.evaluate(si, losses)
                if on_eval:
                    on_eval(row)
            for s in range(stage.steps):
                t0 = time.perf_counter()
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(stage, s)
                batch = make_batch(stage.format, stage.n, self.rng, self.tok, stage.batch, stage.seq_len)
                self.seen[batch[0][batch[1].bool()]] = True
                x, m, kind = (t.to(self.device, non_blocking=True) for t in batch)
                loss = copy_loss(self.model, x, m, kind, stage.loss)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens += int(m.sum())
                self.train_s += time.perf_counter() - t0
                losses.append(loss.item())
                if (s + 1) % self.eval_every == 0 or s + 1 == stage.steps:
                    row = self.evaluate(si, losses)
                    losses = []
                    if on_eval:
                        on_eval(row)
        return self.curve

    def redraw_unseen(self, seed: int = 0) -> dict[str, float]:
        """Redraw the embedding rows of every token the training batches never fed
        (:func:`memact.warmup.embeddings.redraw_rows`); returns its statistics."""
        from memact.warmup.embeddings import redraw_rows

        return redraw_rows(self.model, (~self.seen).nonzero().flatten().tolist(), seed=seed)


def plot_copy_curve(curve: list[dict[str, Any]], path: str | Path) -> None:
    """Held-out accuracy per (format, kind) against training tokens, stage boundaries dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted({k for r in curve for k in r["acc"]}):
        pts = [(r["tokens"] / 1e6, r["acc"][key]) for r in curve if key in r["acc"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=key)
    for prev, r in zip(curve, curve[1:]):
        if r["stage"] != prev["stage"]:
            ax.axvline(r["tokens"] / 1e6, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out accuracy at the target token")
    ax.set_ylim(0, 1.02)
    ax.set_title("copy warm-up (format/kind; dotted: next stage)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copy_warmup(model_dir: str | Path, out: str | Path, stages: tuple[Stage, ...] = DEFAULT_STAGES,
                eval_every: int = 500, seed: int = 0, device: str = "auto",
                redraw_unseen: bool = True) -> Path:
    """Warm up the model in ``model_dir`` stage by stage; write it to ``out``.

    ``redraw_unseen``: at the end, give the embedding rows of every token the warm-up never
    fed a fresh random direction (:meth:`CopyWarmup.redraw_unseen`).

    Output (written to a hidden sibling directory, renamed into place at the end, so an
    interrupted run leaves no half-written ``out``): the model and tokenizer
    (``save_pretrained``), ``recall_curve.jsonl`` (one row per evaluation),
    ``recall_curve.png`` and ``pretrain_config.json`` (the recipe; ``redraw_unseen`` holds the
    redraw's statistics). ``device``: ``auto`` (a GPU when torch
    sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; the model is trained in fp32 on it.
    """
    import torch

    from memact.models.model import count_parameters, load_policy, publish, resolve_device, staging_dir

    out = Path(out)
    torch.manual_seed(seed)
    model, tokenizer = load_policy(model_dir, device=resolve_device(device))
    staging = staging_dir(out)
    config = {"recipe": "copy", "stages": [asdict(s) for s in stages], "eval_every": eval_every, "seed": seed,
              "model": str(model_dir), "redraw_unseen": redraw_unseen}
    (staging / "pretrain_config.json").write_text(json.dumps(config, indent=1))
    total = sum(s.steps for s in stages)
    print(f"[memact] pretrain: {count_parameters(model):,} parameters on {model.device}, "
          f"{len(stages)} stages, "
          f"{total:,} steps: {stages_text(stages)}", flush=True)
    warm = CopyWarmup(model, tokenizer, stages, eval_every=eval_every, seed=seed,
                      log=lambda s: print(s, flush=True))
    log_path = staging / "recall_curve.jsonl"

    def append(row: dict[str, Any]) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    warm.run(on_eval=append)
    if redraw_unseen:
        stats = warm.redraw_unseen(seed)
        print(f"[pretrain] redrew the embedding rows of the {stats['rows']:,} tokens the warm-up never fed "
              f"(mean pairwise cosine {stats['cos_before']} before; norm {stats['norm']} each)", flush=True)
        config["redraw_unseen"] = stats
        (staging / "pretrain_config.json").write_text(json.dumps(config, indent=1))
        # The redrawn rows are also output rows (tied embeddings) at the fed rows' norm: the
        # argmax recall falls to about 0 until SFT trains the head; record what is saved.
        row = warm.evaluate(len(stages) - 1, [])
        row["after_redraw"] = True
        append(row)
    plot_copy_curve(warm.curve, staging / "recall_curve.png")
    publish(model, tokenizer, staging, out)
    print(f"[memact] wrote {out}: held-out acc {warm.curve[-1]['acc']} after {warm.step:,} steps, "
          f"{warm.tokens:,} tokens, {warm.train_s / 60:.1f} min of training", flush=True)
    return out
