"""`leaklab gradient ...`: gradient inversion attacks, threat settings, defenses, sweeps and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from leaklab.attacks.registry import GRADIENT_ATTACKS
from leaklab.cli import common
from leaklab.core import Entry, parse_pairs
from leaklab.errors import LeaklabError
from leaklab.threat.registry import THREAT_SETTINGS

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err = Console(stderr=True)


@app.command("attack")
def attack_cmd(
    attack: Annotated[str, typer.Option(help=f"Attack: {GRADIENT_ATTACKS.help_names()} (see 'list').")] = "somp",
    model: Annotated[
        str | None,
        typer.Option(
            help="Model (packaged name, HF folder, GGUF file or hub name); default "
            "smollm2-135m, or the update's model with --update."
        ),
    ] = None,
    corpus: Annotated[str, typer.Option(help="Private corpus the victim batches are drawn from.")] = "rotten-tomatoes",
    batch_size: Annotated[
        int | None,
        typer.Option(help="Texts per private batch (default 4; with --update it must agree with the update)."),
    ] = None,
    min_tokens: Annotated[int, typer.Option(help="Shortest private text, in tokens.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Longest private text, in tokens.")] = 32,
    batches: Annotated[int, typer.Option(help="Private batches to attack (seeds seed, seed+1, ...).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first batch draw.")] = 0,
    task: Annotated[
        str | None,
        typer.Option(help="Victim training task: next-token or classify (default next-token, or the update's)."),
    ] = None,
    num_labels: Annotated[
        int | None, typer.Option(help="Classifier labels (classify; default 2, or the update's).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<time>-<label>).")] = None,
    overwrite: common.OverwriteOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the aggregate as JSON.")] = False,
    update: Annotated[Path | None, typer.Option(help="Attack this saved update instead of fresh batches.")] = None,
    batch_size_known: Annotated[
        bool,
        typer.Option(help="Threat model: the server learns the batch size (FedSGD servers see sample counts)."),
    ] = True,
    attack_option: Annotated[
        list[str] | None, typer.Option("--attack-option", help="k=v option of the attack, e.g. lm_weight=0.5.")
    ] = None,
) -> None:
    """Run a gradient inversion attack and score it against the private texts (matched ROUGE, token F1).

    Any threat setting's update works with every attack (its view is applied first). Exit code 3: the attack
    could not run on this update, or found no signal (the reason is printed; never a score of 0)."""
    from leaklab.core import parse_pairs
    from leaklab.evaluate import as_json as to_json
    from leaklab.evaluate import run_gradient_eval, run_update_eval, show_run
    from leaklab.threat import ThreatFlags

    if batches < 1:
        raise LeaklabError(f"--batches must be at least 1, got {batches}")
    if batch_size is not None and batch_size < 1:
        raise LeaklabError(f"--batch-size must be at least 1, got {batch_size}")
    status = err if as_json else console
    options = parse_pairs(attack_option, "attack option")
    if update is not None:
        summary = run_update_eval(
            attack,
            update,
            model,
            batch_size,
            out=out,
            console=status,
            batch_size_known=batch_size_known,
            attack_options=options,
            overwrite=overwrite,
            task=task,
            num_labels=num_labels,
        )
    else:
        summary = run_gradient_eval(
            attack=attack,
            model=model or "smollm2-135m",
            corpus=corpus,
            batch_size=batch_size or 4,
            batches=batches,
            seed=seed,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            task=task or "next-token",
            num_labels=2 if num_labels is None else num_labels,
            flags=ThreatFlags(batch_size_known=batch_size_known),
            attack_options=options,
            out=out,
            console=status,
            overwrite=overwrite,
        )
    if as_json:
        print(json.dumps(to_json(summary), indent=2))
    else:
        show_run(summary, console)
    if summary["aggregate"]["status"] != "recovered":
        raise typer.Exit(3)


@app.command("list")
def list_cmd(as_json: common.JsonOpt = False) -> None:
    """List the gradient attacks, the settings each supports, and their options with defaults."""
    common.list_entries(GRADIENT_ATTACKS, "gradient attacks (-o / --attack-option k=v)", as_json, supports=_settings_of)


def _settings_of(entry: Entry) -> str:
    return ", ".join(entry.settings) if entry.settings else "all (each through its view)"


SettingOpt = Annotated[str, typer.Option(help=f"Threat setting: {THREAT_SETTINGS.help_names()} (see 'settings').")]
DefenseOpt = Annotated[
    list[str] | None, typer.Option("--defense", help="NAME or NAME:k=v,k=v (repeatable, in order; see 'defenses').")
]
ParamOpt = Annotated[
    list[str] | None, typer.Option("--defense-param", help="k=v for the single --defense (repeatable).")
]
SettingOptionOpt = Annotated[
    list[str] | None,
    typer.Option("--setting-option", help="k=v option of the setting, e.g. r=4 (repeatable; see 'settings')."),
]


def parse_defenses(specs: list[str] | None, params: list[str] | None) -> list:
    """Defense objects from CLI specs; bare ``--defense-param`` items need exactly one defense."""
    from leaklab.defenses import parse_defense

    specs = specs or []
    if params and len(specs) != 1:
        raise LeaklabError("--defense-param needs exactly one --defense; with several use NAME:k=v,k=v")
    return [parse_defense(spec, params) for spec in specs]


def setting_options(
    setting: str,
    minibatch: int | None,
    clients: int,
    inner: str,
    reduce: str,
    lora_r: int,
    lora_alpha: int,
    lora_targets: str,
    lora_seed: int,
    pairing: str,
    beta: float,
    pairs: list[str] | None = None,
) -> dict[str, Any]:
    """The options of the chosen setting (and, for secagg, its inner setting) from its flags, then the
    ``--setting-option`` pairs, typed and checked by the setting's config."""
    from leaklab.threat.settings import resolve_setting

    from_flags = {
        "minibatch": minibatch,
        "clients": clients,
        "inner": inner,
        "reduce": reduce,
        "r": lora_r,
        "alpha": lora_alpha,
        "targets": lora_targets,
        "lora_seed": lora_seed,
        "pairing": pairing,
        "beta": beta,
    }
    given = parse_pairs(pairs, "setting option")
    keys = set(THREAT_SETTINGS.get(setting).config.keys())
    if "inner" in keys:
        keys |= set(THREAT_SETTINGS.get(str(given.get("inner", inner))).config.keys())
    values = {k: v for k, v in from_flags.items() if k in keys and v is not None}
    return resolve_setting(setting, {**values, **given}).to_dict()


@app.command("update-setting")
def update_setting_cmd(
    setting: SettingOpt = "fedsgd",
    defense: DefenseOpt = None,
    defense_param: ParamOpt = None,
    model: common.ModelOpt = "smollm2-135m",
    corpus: common.CorpusOpt = "rotten-tomatoes",
    batch_size: Annotated[int, typer.Option(help="Texts per client (pairs for dpo/reward).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the batch draw, dropout and noise.")] = 0,
    out: common.UpdateOutOpt = Path("update.safetensors"),
    task: common.TaskOpt = "next-token",
    num_labels: common.NumLabelsOpt = 2,
    init_seed: Annotated[int, typer.Option(help="Seed of randomly initialised model parts.")] = 0,
    min_tokens: common.MinTokensOpt = 2,
    max_tokens: common.MaxTokensOpt = 64,
    train_mode: Annotated[bool, typer.Option(help="Dropout on during local training.")] = False,
    batch_size_known: Annotated[bool, typer.Option(help="Server learns the batch size.")] = True,
    lr: Annotated[
        float | None,
        typer.Option(help="Local SGD learning rate: share a delta (fedavg; optional for lora/dpo)."),
    ] = None,
    local_steps: Annotated[int, typer.Option(help="Local passes over the batch (with --lr).")] = 1,
    minibatch: Annotated[int | None, typer.Option(help="Texts per local SGD step (default: all).")] = None,
    clients: Annotated[int, typer.Option(help="secagg: number of clients.")] = 2,
    inner: Annotated[str, typer.Option(help="secagg: each client's setting.")] = "fedsgd",
    reduce: Annotated[str, typer.Option(help="secagg: mean or sum.")] = "mean",
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lora_targets: Annotated[str, typer.Option(help="LoRA targets: attention, qv or q.")] = "attention",
    lora_seed: Annotated[int, typer.Option(help="Seed of the LoRA A init.")] = 0,
    pairing: Annotated[str, typer.Option(help="dpo/reward pairs: shuffle or label.")] = "shuffle",
    beta: Annotated[float, typer.Option(help="DPO beta.")] = 0.1,
    setting_option: SettingOptionOpt = None,
) -> None:
    """Compute one client's update in a threat setting, with defenses, and save it (Secret beside it)."""
    from leaklab.defenses import defended_update
    from leaklab.models import ModelRef
    from leaklab.threat import ThreatFlags, save_update
    from leaklab.threat.store import secret_path

    defs = parse_defenses(defense, defense_param)
    ref = ModelRef(model, task, num_labels, init_seed)
    flags = ThreatFlags(
        batch_size_known=batch_size_known, train_mode=train_mode, local_steps=local_steps, learning_rate=lr
    )
    opts = setting_options(
        setting,
        minibatch,
        clients,
        inner,
        reduce,
        lora_r,
        lora_alpha,
        lora_targets,
        lora_seed,
        pairing,
        beta,
        setting_option,
    )
    with console.status(f"computing a {setting} update on {model}"):
        obs, secret = defended_update(
            setting, ref, corpus, batch_size, seed, defs, min_tokens, max_tokens, flags, **opts
        )
        save_update(out, obs, secret)
    console.print(f"wrote {out} ({obs.setting}, {len(obs.gradients)} tensors) and {secret_path(out)}")
    for rec in obs.defenses:
        eps = f", ε={rec['epsilon']:.3g}" if rec.get("epsilon") is not None else ""
        console.print(f"  defense {rec['name']} ({rec['side']}) {rec['params']}{eps}")


@app.command("apply-defense")
def apply_defense_cmd(
    update: Annotated[Path, typer.Argument(help="Update file written by update / update-setting.")],
    defense: DefenseOpt = None,
    defense_param: ParamOpt = None,
    out: Annotated[Path, typer.Option(help="Defended update file to write.")] = Path("defended.safetensors"),
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
) -> None:
    """Apply server-side defenses (clip, noise, top-k, frozen embeddings) to a saved update."""
    from leaklab.defenses import apply_defenses
    from leaklab.threat import load_secret, load_update, save_update

    defs = parse_defenses(defense, defense_param)
    if not defs:
        raise LeaklabError("give at least one --defense")
    original = load_update(update)
    obs = apply_defenses(original, defs, seed)
    save_update(out, obs, load_secret(update, original))
    console.print(f"wrote {out} ({len(obs.gradients)} tensors; defenses: {[r['name'] for r in obs.defenses]})")


@app.command("defenses")
def defenses_cmd(as_json: common.JsonOpt = False) -> None:
    """List the defenses, where each acts, and their options."""
    from leaklab.defenses import DEFENSES

    common.list_entries(DEFENSES, "defenses (--defense NAME:k=v,...)", as_json, side=lambda e: e.extra.get("side"))


@app.command("settings")
def settings_cmd(as_json: common.JsonOpt = False) -> None:
    """List the threat settings and their options."""
    common.list_entries(THREAT_SETTINGS, "threat settings (--setting NAME --setting-option k=v)", as_json)


@app.command("sweep")
def sweep_cmd(
    defense: Annotated[str, typer.Option(help="Defense to sweep (see 'defenses').")],
    values: Annotated[str, typer.Option(help="Comma-separated values of its strength parameter.")] = "",
    param: Annotated[str | None, typer.Option(help="Parameter the values set (default per defense).")] = None,
    defense_param: ParamOpt = None,
    attack: Annotated[str, typer.Option(help=f"Attack: {GRADIENT_ATTACKS.help_names()}.")] = "somp",
    attack_option: Annotated[
        list[str] | None, typer.Option("--attack-option", help="k=v option of the attack, e.g. budget_s=120.")
    ] = None,
    setting: SettingOpt = "fedsgd",
    setting_option: SettingOptionOpt = None,
    model: Annotated[str, typer.Option(help="Model name.")] = "smollm2-135m",
    corpus: Annotated[str, typer.Option(help="Corpus.")] = "rotten-tomatoes",
    batch_size: Annotated[int, typer.Option(help="Texts per client.")] = 4,
    batches: Annotated[int, typer.Option(help="Private batches per value.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the first batch.")] = 0,
    min_tokens: common.MinTokensOpt = 4,
    max_tokens: common.MaxTokensOpt = 32,
    lr: Annotated[float | None, typer.Option(help="Local SGD learning rate (fedavg).")] = None,
    local_steps: Annotated[int, typer.Option(help="Local passes (with --lr).")] = 1,
    server_lr: Annotated[float, typer.Option(help="Step size applying a gradient for utility.")] = 1e-3,
    utility_texts: Annotated[int, typer.Option(help="Public texts scoring utility.")] = 16,
    utility_steps: Annotated[
        int, typer.Option(help="Rounds of defended updates before the horizon's validation loss (0: skip).")
    ] = 20,
    out: Annotated[Path, typer.Option(help="Folder for sweep.json/.md/.png.")] = Path("sweep"),
    overwrite: common.OverwriteOpt = False,
) -> None:
    """Attack ROUGE-1 vs defense strength (and ε) vs utility; writes a table, JSON and a plot."""
    from leaklab.defenses.utility import HorizonOptions
    from leaklab.sweep import sweep
    from leaklab.threat import ThreatFlags
    from leaklab.threat.settings import resolve_setting

    fixed = parse_pairs(defense_param, "defense parameter")
    typed_setting = resolve_setting(setting, setting_option or []).to_dict()
    vals = [v.strip() for v in values.split(",") if v.strip()]
    flags = ThreatFlags(local_steps=local_steps, learning_rate=lr)
    result = sweep(
        defense,
        vals,
        attack,
        model,
        corpus,
        batch_size,
        batches,
        seed,
        out,
        setting=setting,
        param=param,
        defense_params=fixed,
        attack_options=parse_pairs(attack_option, "attack option"),
        flags=flags,
        setting_options=typed_setting,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        utility_texts=utility_texts,
        server_lr=server_lr,
        horizon=HorizonOptions(steps=utility_steps, server_lr=server_lr, texts=utility_texts),
        console=console,
        overwrite=overwrite,
    )
    from leaklab.sweep import markdown_table

    console.print(markdown_table(result))
    console.print(f"wrote {out}/sweep.json, sweep.md, sweep.png")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LeaklabError(f"expected comma-separated integers, got '{text}'") from None


def attack_options(items: list[str] | None) -> dict[str, dict]:
    """``["somp:max_atoms=256", "somp:budget_s=400"]`` → ``{"somp": {"max_atoms": 256, "budget_s": 400}}``
    (typed by each attack's config; unknown attacks and options fail listing the valid ones)."""
    from leaklab.core import parse_pairs

    grouped: dict[str, list[str]] = {}
    for item in items or []:
        attack, sep, pair = item.partition(":")
        if not sep or not attack or "=" not in pair:
            raise LeaklabError(f"attack option '{item}' is not of the form ATTACK:key=value")
        grouped.setdefault(attack, []).append(pair)
    out: dict[str, dict] = {}
    for attack, pairs in grouped.items():
        entry = GRADIENT_ATTACKS.get(attack)
        given = parse_pairs(pairs, "attack option")
        out[entry.name] = {k: v for k, v in entry.options(given).to_dict().items() if k in given}
    return out


@app.command("bench")
def bench_cmd(
    out: Annotated[Path, typer.Option(help="Results folder (cells/ + gradient.md + PNGs).")] = Path(
        "benchmarks/results/gradient"
    ),
    model: Annotated[str, typer.Option(help="Model.")] = "smollm2-135m",
    regimes: Annotated[str, typer.Option(help="short,long,italian,spanish,chinese,german")] = "short,long",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8,16,32,64,128",
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks.")] = "somp,dager",
    batches: Annotated[int, typer.Option(help="Batches per cell.")] = 5,
    seed: Annotated[int, typer.Option(help="First batch seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Redo cells that are already stored.")] = False,
    report_only: Annotated[bool, typer.Option(help="Only rebuild the table and plots from stored cells.")] = False,
    attack_option: Annotated[
        list[str] | None,
        typer.Option(
            "--attack-option",
            help="ATTACK:key=value, a non-default option of one attack (repeatable; recorded in the cell and "
            "shown in the table), e.g. somp:max_atoms=256.",
        ),
    ] = None,
) -> None:
    """Run the missing cells of the grid (resumable), then write the table, plots and target check."""
    from leaklab.bench.gradient import run_grid, write_report

    console = Console(stderr=True)
    if not report_only:
        run_grid(
            out,
            model,
            regimes.split(","),
            _ints(batch_sizes),
            attacks.split(","),
            batches,
            seed,
            force=force,
            console=console,
            options=attack_options(attack_option),
        )
    md = write_report(out)
    Console().print(md.read_text(encoding="utf-8"))
