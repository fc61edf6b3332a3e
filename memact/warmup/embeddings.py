"""Embedding surgery for the warm-up: redraw the rows a warm-up never trained."""

from __future__ import annotations


def redraw_rows(model, rows, seed: int = 0) -> dict[str, float]:
    """Give each embedding row in ``rows`` a fresh random direction, in place; returns statistics.

    Each redrawn row is a Gaussian direction scaled to the median norm of the rows not
    redrawn. A warm-up that feeds only some tokens leaves the rows of all the others collapsed
    onto one vector, which SFT does not separate again (docs/pretrain.md, "Fifth round"). With
    tied embeddings the output rows change too.

    Returns ``rows`` (how many), ``cos_before`` (their mean pairwise cosine before) and
    ``norm`` (the norm given to each); both None when ``rows`` is empty.
    """
    import torch

    emb = model.get_input_embeddings().weight
    index = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.long)
    if index.numel() == 0:
        return {"rows": 0, "cos_before": None, "norm": None}  # None, not NaN: pretrain_config.json stays JSON
    keep = torch.ones(emb.shape[0], dtype=torch.bool)
    keep[index] = False
    with torch.no_grad():
        w = emb.detach().float().cpu()
        unit = torch.nn.functional.normalize(w[index], dim=1)
        n = unit.shape[0]
        cos = ((unit.sum(0).pow(2).sum() - n) / (n * (n - 1))).item() if n > 1 else 1.0
        norm = w[keep].norm(dim=1).median().item() if keep.any() else w.norm(dim=1).median().item()
        gen = torch.Generator().manual_seed(seed + 11)
        fresh = torch.randn(n, emb.shape[1], generator=gen)
        fresh *= norm / fresh.norm(dim=1, keepdim=True)
        emb[index.to(emb.device)] = fresh.to(device=emb.device, dtype=emb.dtype)
    return {"rows": n, "cos_before": round(cos, 4), "norm": round(norm, 4)}
