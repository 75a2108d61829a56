"""GRAB's lever (issue 25): where unknown dropout masks hurt the gradient attacks, and TAG with the masks
learned alongside the embeddings (``tag:learn_dropout=True``).

Three parts, each on seeded rotten-tomatoes batches (short regime, 8–32 tokens):

* ``noop`` — for each packaged next-token model, the active dropout calls of its train-mode forward and the
  relative difference ‖g_train − g_eval‖ / ‖g_eval‖ of one batch's update (B = 2);
* ``span`` — SOMP and DAGER with dropout off and on (outcome, ROUGE-1/2, seconds);
* ``tag`` — on the same batch and steps, with the text lengths granted (so that masks have the batch's
  shape): TAG on the dropout-off update; and on one dropout-on update (computed with eager attention so that
  every mask the client drew is recorded), TAG matching in eval mode (an attacker who ignores dropout), TAG
  with learned masks (``learn_dropout=True``), and TAG given the client's own masks (an oracle: the gap it
  closes is all that learning the masks could recover).

* ``maskspan`` — GPT-2 family only: the layer-1 span test with the embedding-dropout mask as an unknown.
  The client's layer-1 attention input is x = LN(m ⊙ (e_v + p_i) / (1 − p)); with P the projector off the
  span of the observed c_attn gradient, x lies in the span iff  P γ⊙C z − Σ_{j∈D} z_j P γ⊙C e_j + c P β = 0
  (z = e_v + p_i, C centring, D the dropped coordinates, c the inverse LN scale): a sparse least-squares problem,
  solved by OMP over the d coordinate atoms (up to p·d + 3·sd(Binomial(d, p)) of them). For every candidate
  (token from the leaked token set, position) the relative residual is reported; the plain span test is
  the same fit with no atom. Reported: recall and precision of the (position, token) pairs whose residual
  is below τ, against the batch's true pairs (recall over all true pairs, in the pool or not).

Results are cached per cell in ``--out``/grab.json (rerunning skips cells already there)::

    python benchmarks/grab_probe.py noop
    python benchmarks/grab_probe.py span --model tiny-gpt2 --batch-sizes 1 4 --seeds 0 1
    python benchmarks/grab_probe.py tag --model tiny-gpt2 --batch-sizes 1 4 --seeds 0 1 --steps 100
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from leaklab.attacks.base import make_attack
from leaklab.attacks.gradient.dropout import FixedMasks, MaskedSpanTest, RecordMasks, dropout_forward, mask_atoms
from leaklab.attacks.gradient.optim import Dummy, Matcher, Setup, TagAttack, TagOptions, leaked_pool
from leaklab.experiments.runner import attack_batch
from leaklab.io import atomic_write_text
from leaklab.metrics.text import score_batch
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.fedsgd import batch_loss, collate, gradient
from leaklab.threat.observation import Observation, Secret, ThreatFlags
from leaklab.threat.settings import client_update

TAUS = (1e-4, 1e-3, 1e-2)
OUT = Path(__file__).parent / "results" / "gradient" / "grab"
NEXT_TOKEN_MODELS = ("tiny-llama", "tiny-gpt2", "smollm2-135m", "gpt2-arch")
TAG_ARMS = (
    "tag, dropout off",
    "tag (eval matching), dropout on",
    "tag + learned masks, dropout on",
    "tag + the client's masks (oracle), dropout on",
)


class OracleTag(TagAttack):
    """TAG matching with the client's own dropout masks (granted by the probe, not an attack)."""

    def __init__(self, opts: TagOptions, masks: list[torch.Tensor]) -> None:
        super().__init__(opts)
        self.masks = masks

    def optimise(self, matcher: Matcher, dummy: Dummy, s: Setup, deadline: float) -> dict[str, Any]:
        with dropout_forward(matcher.model):
            matcher.relax = FixedMasks(self.masks)
            out = super().optimise(matcher, dummy, s, deadline)
            final = float(matcher.distance(dummy.x.detach(), dummy.labels(), dummy.mask, False))
        matcher.relax = None
        return out | {"oracle_final_distance": final, "dropout_masks": "the client's own (granted by the probe)"}


def recorded_update(name: str, b: int, seed: int) -> tuple[Observation, Secret, list[torch.Tensor]]:
    """A dropout-on FedSGD update (lengths granted) computed in eager attention, with the masks it drew."""
    flags = ThreatFlags(train_mode=True, lengths_known=True)
    obs, secret = client_update(ModelRef(name), "rotten-tomatoes", b, seed, 8, 32, flags)
    loaded = load_model(obs.model)
    batch = collate(loaded, [list(t) for t in secret.token_ids], list(secret.labels))
    model = loaded.model
    rec = RecordMasks()
    with dropout_forward(model), torch.random.fork_rng():
        torch.manual_seed(seed)
        with rec:
            loss = batch_loss(loaded, batch)
        named = [(n, p) for n, p in model.named_parameters() if n in obs.gradients]
        grads = torch.autograd.grad(loss, [p for _, p in named])
    gradients = {n: g.detach().to("cpu", copy=True) for (n, _), g in zip(named, grads, strict=True)}
    return replace(obs, gradients=gradients), secret, rec.masks


def tag_cells(name: str, b: int, seed: int, steps: int, mask_lr: float) -> dict[str, dict[str, Any]]:
    """The four TAG arms on one batch."""
    opts = TagOptions(steps=steps)
    off, secret = client_update(
        ModelRef(name), "rotten-tomatoes", b, seed, 8, 32, ThreatFlags(train_mode=False, lengths_known=True)
    )
    on, secret_on, masks = recorded_update(name, b, seed)
    assert secret_on.texts == secret.texts
    attacks = (
        (off, TagAttack(opts)),
        (on, TagAttack(opts)),
        (on, TagAttack(replace(opts, learn_dropout=True, mask_lr=mask_lr))),
        (on, OracleTag(opts, masks)),
    )
    return {arm: scored(obs, secret, attack) for arm, (obs, attack) in zip(TAG_ARMS, attacks, strict=True)}


def scored(obs: Observation, secret: Secret, attack: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    record = attack_batch(attack, obs, secret)
    agg = record.aggregate or {}
    keep = ("steps", "final_distance", "oracle_final_distance", "dropout_masks")
    return {
        "status": record.status,
        "reason": record.reason,
        "rouge1": agg.get("rouge1"),
        "rouge2": agg.get("rouge2"),
        "seconds": time.perf_counter() - t0,
        "tokens": record.tokens,
        "info": {k: v for k, v in record.info.items() if k in keep},
    }


class Cache:
    """Cells by key in a JSON file, written atomically after each cell."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cells: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str) -> Any:
        return self.cells.get(key)

    def put(self, key: str, value: Any) -> None:
        self.cells[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.cells, indent=1, sort_keys=True))


def noop_cell(name: str) -> dict[str, Any]:
    """Active dropout calls and the train/eval relative gradient difference of one B = 2 batch."""
    ref = ModelRef(name)
    loaded = load_model(ref)
    texts = ["the movie was a delight from start to end", "a dull and tired remake of an old story"]
    batch = collate(loaded, [loaded.encode(t) for t in texts], [0, 0])
    off = gradient(loaded, batch, train_mode=False)
    on = gradient(loaded, batch, train_mode=True, seed=0)
    diff = sum(float((on[n].double() - off[n].double()).pow(2).sum()) for n in off)
    norm = sum(float(off[n].double().pow(2).sum()) for n in off)
    rec = RecordMasks()
    with dropout_forward(loaded.model), torch.no_grad(), rec:
        loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return {"dropout_calls": len(rec.masks), "rates": sorted(set(rec.rates)), "rel_diff": (diff / norm) ** 0.5}


def span_cell(name: str, b: int, seed: int, train_mode: bool, attack: str) -> dict[str, Any]:
    obs, secret = client_update(ModelRef(name), "rotten-tomatoes", b, seed, 8, 32, ThreatFlags(train_mode=train_mode))
    return scored(obs, secret, make_attack(attack))


def position_decode(
    loaded: Any, secret: Secret, resid: torch.Tensor, pool_ids: list[int], tau: float
) -> dict[str, Any]:
    """B = 1 text from layer 1 alone (GPT-2's absolute positions): position by position the pool token of
    lowest residual while it is below ``tau``; ROUGE-1/2 against the true text."""
    ids: list[int] = []
    for i in range(resid.shape[0]):
        k = int(resid[i].argmin())
        if not float(resid[i, k]) < tau:
            break
        ids.append(pool_ids[k])
    agg = score_batch([loaded.decode(ids)], list(secret.texts), [ids], [list(t) for t in secret.token_ids])
    scores = agg.aggregate()
    return {"tokens": len(ids), "rouge1": scores["rouge1"], "rouge2": scores["rouge2"]}


def maskspan_cell(name: str, b: int, seed: int, train_mode: bool) -> dict[str, Any]:
    """Layer-1 span test, plain and with the embedding-dropout mask as unknowns, on one update."""
    flags = ThreatFlags(train_mode=train_mode)
    obs, secret = client_update(ModelRef(name), "rotten-tomatoes", b, seed, 8, 32, flags)
    loaded = load_model(obs.model)
    tr = loaded.model.transformer
    p, d = float(tr.drop.p), tr.wte.weight.shape[1]
    g = obs.gradients["transformer.h.0.attn.c_attn.weight"].double()  # (in, out): columns span the inputs
    u, sv, _ = torch.linalg.svd(g, full_matrices=False)
    rank = int((sv > sv[0] * 1e-6).sum())
    test = MaskedSpanTest(u[:, :rank], tr.h[0].ln_1.weight.detach(), tr.h[0].ln_1.bias.detach())
    atoms = mask_atoms(d, p) if train_mode else 0
    pool = leaked_pool(obs, loaded)
    pool_ids = pool.tolist() if pool is not None else []
    width = max(len(t) for t in secret.token_ids)
    wte, wpe = tr.wte.weight.detach().double(), tr.wpe.weight.detach().double()
    t0 = time.perf_counter()
    resid = torch.full((width, len(pool_ids), 2), float("nan"), dtype=torch.float64)  # plain, masked
    for i in range(width):
        for k, v in enumerate(pool_ids):
            fit = test.residuals(wte[v] + wpe[i], atoms)
            resid[i, k, 0], resid[i, k, 1] = fit[0], fit[-1]
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"rank": rank, "d": d, "p": p, "atoms": atoms, "pool": len(pool_ids), "seconds": seconds}
    true_pairs = {(i, v) for ids in secret.token_ids for i, v in enumerate(ids)}
    out["true_pairs"] = len(true_pairs)
    out["true_in_pool"] = sum(v in pool_ids for _, v in true_pairs) / len(true_pairs)
    is_true = torch.zeros(width, len(pool_ids), dtype=torch.bool)
    for i, v in true_pairs:
        if v in pool_ids:
            is_true[i, pool_ids.index(v)] = True
    for col, label in ((0, "plain"), (1, "masked")):
        r = resid[:, :, col]
        cell: dict[str, Any] = {
            "median_true_residual": float(r[is_true].median()),
            "min_false_residual": float(r[~is_true].min()),
            "median_false_residual": float(r[~is_true].median()),
        }
        for tau in TAUS:
            passed = r < tau
            hit = int((passed & is_true).sum())
            cell[f"tau={tau:g}"] = {
                "recall": hit / len(true_pairs),
                "precision": hit / max(1, int(passed.sum())),
            }
        if b == 1:
            cell["b1_text"] = position_decode(loaded, secret, r, pool_ids, 1e-3)
        out[label] = cell
    return out


def final_distance(info: dict[str, Any]) -> float:
    """D at the end, under the masks the arm matched with (the oracle's own; eval mode for plain TAG)."""
    return float(info.get("oracle_final_distance", info.get("final_distance", float("nan"))))


def report(cache: Cache) -> str:
    """Markdown tables of the cached cells."""
    lines = ["| model | active dropout calls (p) | ‖g_train − g_eval‖ / ‖g_eval‖ |", "|---|---|---|"]
    for key, c in cache.cells.items():
        if key.startswith("noop|"):
            lines.append(
                f"| {key[5:]} | {c['dropout_calls']} ({', '.join(map(str, c['rates'])) or '–'}) | {c['rel_diff']:.3f} |"
            )
    lines += ["", "| batch | TAG arm | ROUGE-1 | ROUGE-2 | s | final D |", "|---|---|---|---|---|---|"]
    for key, arms in cache.cells.items():
        if key.startswith("tag|"):
            _, model, b, seed, steps, _ = key.split("|")
            for arm, c in arms.items():
                lines.append(
                    f"| {model} {b} {seed} {steps} | {arm} | {c['rouge1']:.3f} | {c['rouge2']:.3f} | "
                    f"{c['seconds']:.1f} | {c['info'].get('final_distance', float('nan')):.3f} |"
                )
    lines += ["", "| cell | TAG arm | batches | mean ROUGE-1 | mean ROUGE-2 | R-1 above eval matching |"]
    lines.append("|---|---|---|---|---|---|")
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, arms in cache.cells.items():
        if key.startswith("tag|"):
            _, model, b, _, steps, _ = key.split("|")
            groups.setdefault(f"{model} {b} {steps}", []).append(arms)
    for cell, batches in groups.items():
        for arm in TAG_ARMS:
            r1 = [a[arm]["rouge1"] for a in batches]
            r2 = [a[arm]["rouge2"] for a in batches]
            wins = sum(a[arm]["rouge1"] > a[TAG_ARMS[1]]["rouge1"] for a in batches)
            lines.append(
                f"| {cell} | {arm} | {len(batches)} | {sum(r1) / len(r1):.3f} | {sum(r2) / len(r2):.3f} | "
                f"{wins}/{len(batches)} |"
            )
    lines += [
        "",
        "| batch | dropout | rank | plain: recall / precision | masked: recall / precision | "
        "masked: true / min false residual | B=1 text (plain → masked) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, c in cache.cells.items():
        if key.startswith("maskspan|"):
            _, model, b, seed, drop = key.split("|")
            pl, ms = c["plain"], c["masked"]
            t = "tau=0.001"
            text = f"{pl['b1_text']['rouge1']:.3f} → {ms['b1_text']['rouge1']:.3f}" if "b1_text" in pl else ""
            lines.append(
                f"| {model} {b} {seed} ({c['true_pairs']} pairs) | {drop[8:]} | {c['rank']} | "
                f"{pl[t]['recall']:.3f} / {pl[t]['precision']:.3f} | "
                f"{ms[t]['recall']:.3f} / {ms[t]['precision']:.3f} | "
                f"{ms['median_true_residual']:.1e} / {ms['min_false_residual']:.3f} | {text} |"
            )
    return "\n".join(lines)


def show(key: str, cell: dict[str, Any]) -> None:
    print(key, json.dumps(cell, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("noop", "span", "tag", "maskspan", "report"))
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--mask-lr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Cache(args.out / "grab.json")
    if args.part == "report":
        print(report(cache))
        return
    cells: list[tuple[str, Any]] = []
    if args.part == "noop":
        cells = [(f"noop|{m}", lambda m=m: noop_cell(m)) for m in NEXT_TOKEN_MODELS]
    for b in args.batch_sizes:
        for seed in args.seeds:
            if args.part == "span":
                for attack in ("somp", "dager"):
                    for on in (False, True):
                        key = f"span|{args.model}|B={b}|seed={seed}|{attack}|dropout={'on' if on else 'off'}"
                        cells.append((key, lambda a=attack, o=on, b=b, s=seed: span_cell(args.model, b, s, o, a)))
            elif args.part == "maskspan":
                for on in (False, True):
                    key = f"maskspan|{args.model}|B={b}|seed={seed}|dropout={'on' if on else 'off'}"
                    cells.append((key, lambda o=on, b=b, s=seed: maskspan_cell(args.model, b, s, o)))
            elif args.part == "tag":
                key = f"tag|{args.model}|B={b}|seed={seed}|steps={args.steps}|mask_lr={args.mask_lr}"
                cells.append((key, lambda b=b, s=seed: tag_cells(args.model, b, s, args.steps, args.mask_lr)))
    for key, run in cells:
        cell = cache.get(key)
        if cell is None:
            cell = run()
            cache.put(key, cell)
        show(key, cell)


if __name__ == "__main__":
    main()
