"""The `xray-ray` command (also `python -m xray_ray`): one entry point for every tool.

Each subcommand hands the rest of the command line, unchanged, to the `main(argv)` of the module that
implements it, so `xray-ray search --help` and `python -m xray_ray.search --help` print the same flags
(`python -m xray_ray.search` and `python -m xray_ray.data inspect` are the two package entry points kept).
Modules are imported only when their subcommand runs: `xray-ray --help` loads neither torch nor Ray.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, arguments put before the user's, one line of help)
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "search": ("xray_ray.search.command", (), "search CNNs on Ray Tune and export the winner"),
    "predict": ("xray_ray.serve.predict", (), "score images with an exported model (onnxruntime, no torch)"),
    "evaluate": ("xray_ray.serve.evaluate", (), "metrics of an exported model on a labelled data folder"),
    "adapt": ("xray_ray.serve.adapt", (), "site check: will the card's threshold hold on a new site?"),
    "inspect": ("xray_ray.data.inspect", ("inspect",), "what is in a data folder, and the split a search would use"),
    "stability": ("xray_ray.studies.stability", (), "retrain a run's winner with other seeds on the run's own splits"),
    "ablation": ("xray_ray.studies.ablation", (), "one configuration, each idea on or off, several seeds each"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: xray-ray <command> [options]",
        "",
        "Find, on Ray, the best CNN for pediatric chest X-rays (NORMAL vs PNEUMONIA).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`xray-ray <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the module behind the subcommand; returns its exit status (2 for a usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from xray_ray import __version__

        print(f"xray-ray {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(
            f"{usage()}\n\nerror: unknown command {args[0]!r}; choose one of: {', '.join(COMMANDS)}.", file=sys.stderr
        )
        return 2
    module, prefix, _ = COMMANDS[args[0]]
    if args[0] == "adapt" and "--batchnorm" in args:  # re-estimating BatchNorm needs torch: the ship wing's
        module = "xray_ray.ship.batchnorm"
    return importlib.import_module(module).main([*prefix, *args[1:]])


if __name__ == "__main__":
    sys.exit(main())
