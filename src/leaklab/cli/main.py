"""leaklab command line: each sub-command is a thin layer over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leaklab import __version__
from leaklab.cli import common
from leaklab.errors import LeaklabError

app = typer.Typer(
    name="leaklab",
    help="Measure how much private text leaks from shared gradients and embeddings, and what stops it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"leaklab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    from leaklab._quiet import quiet

    quiet()


@app.command("models")
def models_cmd(as_json: common.JsonOpt = False) -> None:
    """List the packaged models (any Hugging Face folder or hub name also works with --model)."""
    from leaklab.models.registry import PACKAGED

    rows = [
        {
            "name": s.name,
            "family": s.family,
            "tasks": list(s.tasks),
            "random_init": s.random_init,
            "description": s.description,
            "source": s.source,
        }
        for s in PACKAGED.values()
    ]
    title = "packaged models (also: any HF folder or hub name)"
    common.print_rows(rows, as_json, title, ("name", "tasks", "description"), _model_cells)


def _model_cells(r: dict) -> tuple[str, str, str]:
    return r["name"], ",".join(r["tasks"]), r["description"]


@app.command("corpora")
def corpora_cmd(as_json: common.JsonOpt = False) -> None:
    """List the packaged corpora (user .txt/.csv/.jsonl files and hf:NAME datasets also work)."""
    from leaklab.corpora import describe_corpora

    title = "packaged corpora (also: .txt/.csv/.jsonl files, hf:dataset[@split] online)"

    def cells(r: dict) -> tuple[str, str, str]:
        return r["name"], r["description"], ", ".join(r["variants"][:8]) + (" …" if len(r["variants"]) > 8 else "")

    common.print_rows(describe_corpora(), as_json, title, ("name", "description", "variants"), cells)


@app.command("update")
def update_cmd(
    model: common.ModelOpt = "smollm2-135m",
    corpus: common.CorpusOpt = "rotten-tomatoes",
    batch_size: Annotated[int, typer.Option(help="Texts in the private batch.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the batch draw and of dropout.")] = 0,
    out: common.UpdateOutOpt = Path("update.safetensors"),
    task: common.TaskOpt = "next-token",
    num_labels: common.NumLabelsOpt = 2,
    min_tokens: common.MinTokensOpt = 1,
    max_tokens: common.MaxTokensOpt = 64,
    train_mode: Annotated[bool, typer.Option(help="Dropout on while computing the update.")] = False,
    batch_size_known: Annotated[bool, typer.Option(help="Server learns the batch size.")] = True,
    init_seed: Annotated[int, typer.Option(help="Seed of randomly initialised model parts.")] = 0,
) -> None:
    """Compute one client's FedSGD update on a private batch and save it (Secret beside it, for scoring)."""
    from leaklab.models import ModelRef
    from leaklab.threat import ThreatFlags, client_update, save_update
    from leaklab.threat.store import secret_path

    ref = ModelRef(model, task, num_labels, init_seed)
    flags = ThreatFlags(batch_size_known=batch_size_known, train_mode=train_mode)
    with console.status(f"computing the update of a {batch_size}-text batch on {model}"):
        obs, secret = client_update(ref, corpus, batch_size, seed, min_tokens, max_tokens, flags)
        save_update(out, obs, secret)
    console.print(f"wrote {out} ({len(obs.gradients)} tensors) and {secret_path(out)} (private texts, for scoring)")


@app.command("demo")
def demo_cmd(
    batch_size: Annotated[int, typer.Option(help="Texts in the private batch.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the batch draw.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder.")] = None,
    overwrite: common.OverwriteOpt = False,
) -> None:
    """SOMP on the packaged defaults (smollm2-135m, rotten-tomatoes): what leaks from one FedSGD update."""
    from leaklab.evaluate import run_gradient_eval, show_run

    summary = run_gradient_eval(
        attack="somp",
        model="smollm2-135m",
        corpus="rotten-tomatoes",
        batch_size=batch_size,
        batches=1,
        seed=seed,
        min_tokens=8,
        max_tokens=32,
        task="next-token",
        out=out,
        console=console,
        overwrite=overwrite,
    )
    show_run(summary, console)


def _mount_subcommands() -> None:
    """The command groups, listed explicitly: a broken module fails loudly instead of vanishing from --help."""
    from leaklab.cli import audit, embed, fl, gradient, keys, lm, monitor, serve, signals

    groups = (
        (audit.app, "audit", "Audit a system: every leakage surface, one self-contained HTML report."),
        (gradient.app, "gradient", "Gradient inversion: attacks, threat settings, defenses, sweeps, benchmarks."),
        (embed.app, "embed", "Embedding inversion attacks, benchmarks and API-defense evaluation."),
        (lm.app, "lm", "Fine-tuned causal LMs: membership inference, canary extraction, DP fine-tuning."),
        (keys.app, "keys", "API keys of the embedding service."),
        (monitor.app, "monitor", "Probe detection reports of the embedding service."),
        (signals.app, "signals", "Red-team signals over vector dumps and the service log."),
        (fl.app, "fl", "Federated learning on Flower: simulate a federation and attack its clients' updates."),
    )
    for sub, name, help_text in groups:
        app.add_typer(sub, name=name, help=help_text)
    app.command("serve")(serve.serve)


_mount_subcommands()

#: the commands that run a model (victim updates, attacks, benches, sweeps, the service's encoder): each takes
#: --device, default $LEAKLAB_DEVICE or auto
DEVICE_COMMANDS = (
    ("audit",),
    ("update",),
    ("demo",),
    ("serve",),
    ("gradient", "attack"),
    ("gradient", "update-setting"),
    ("gradient", "sweep"),
    ("gradient", "bench"),
    ("embed", "attack"),
    ("embed", "train"),
    ("embed", "invert"),
    ("embed", "bench"),
    ("embed", "defend-eval"),
    ("fl", "simulate"),
    ("lm", "finetune"),
    ("lm", "attack"),
    ("lm", "membership"),
)


def _use_device(_ctx, _param, value: str | None) -> str | None:
    """Resolve --device now (a bad one stops here, one line) and pass it to child processes too."""
    import os

    from leaklab.models.device import ENV, set_device

    set_device(value)
    if value is not None:
        os.environ[ENV] = value
    return value


def command():
    """The click command of :data:`app`, with ``--device`` added to every command of :data:`DEVICE_COMMANDS`."""
    import click

    root = typer.main.get_command(app)
    for path in DEVICE_COMMANDS:
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        cmd.params.append(
            click.Option(
                ["--device"],
                default=None,
                expose_value=False,
                callback=_use_device,
                help="Where models run: auto (CUDA when present), cpu, cuda or cuda:N (env LEAKLAB_DEVICE; "
                "default auto).",
            )
        )
    return root


def main() -> None:
    """Console entry point: user errors print one line and exit 2; no traceback. A command's exit code (e.g. 3:
    the attack did not recover; 130: interrupted) is the process's: without standalone mode click returns it
    instead of exiting, so it is passed on here."""
    try:
        code = command()(standalone_mode=False)
    except LeaklabError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors etc.
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:
        err.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
