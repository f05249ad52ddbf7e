"""`grounding_dino <action> -e spec.yaml [key=value ...]`: the TAO-compatible command line.

The spec is merged onto the action's defaults, overrides are applied, and the result is validated and preflighted
(sdk.preflight, the checks a job runs: missing files, archives given as folders, bad annotations) before anything
runs. On bad input every problem is printed (key path, bad value or file, the fix), nothing is written, and the exit
code is 2. On good input `grounding_dino.actions.run_action` runs it (the one launcher every entry point uses); its
pre-check (checkpoints, TensorRT) and errors in the user's data found mid-run (grounding_dino.errors.UserError) also
print their message alone and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path
from typing import List, Optional

from grounding_dino import config as gd_config
from grounding_dino.actions import ActionError, run_action
from grounding_dino.errors import UserError
from sdk.errors import SkillBankError, SpecError
from sdk.preflight import check
from sdk.skill_info import load_skill_info
from sdk.spec import resolve_spec, validate

EPILOG = """\
overrides:
  key=value pairs applied after the spec file, with YAML value rules (3 is an integer, 1e-4 a float, true/false,
  null, [1, 2] a list). Keys are dotted paths with list indexes, e.g.
    train.num_epochs=20 dataset.train_data_sources[0].json_file=/data/train_odvg.jsonl
  An index may be at most the list's length (that appends one item). Short names: {shorthand}.

exit codes: 0 success, 1 the action failed or cannot be imported, 2 bad spec, arguments, files or data (the message
  names the key, the path and the fix; nothing is written unless the problem is found in the data mid-run).
"""


def build_parser() -> argparse.ArgumentParser:
    info = load_skill_info()
    shorthand = ", ".join(f"{k} ({v})" for k, v in info.shorthand.items())
    parser = argparse.ArgumentParser(
        prog="grounding_dino",
        description="Grounding DINO (open-vocabulary, text-prompted object detection): run one action on a spec.",
        epilog=EPILOG.format(shorthand=shorthand),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('grounding-dino-skillbank')}")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    help=", ".join(gd_config.ACTIONS))
    for name in gd_config.ACTIONS:
        sub = actions.add_parser(
            name, help=f"run {name}", description=f"Grounding DINO {name}. Template: "
            f"{info.action(name).template.relative_to(info.root)}",
            epilog=EPILOG.format(shorthand=shorthand), formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("-e", "--experiment_spec_file", "--experiment-spec-file", dest="spec", type=Path,
                         help="spec YAML (TAO format); omitted = the action's defaults plus the overrides")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides (see below)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"grounding_dino {args.action}"
    try:
        spec = resolve_spec(args.action, args.spec, args.overrides)
        validate(spec, args.action)
        config = gd_config.load_experiment(spec)
        info = load_skill_info().action(args.action)
        check(spec, args.action, info.inputs, info.data_sources, stage="runtime",
              warn=lambda warning: print(f"{prog}: [preflight] {warning}", file=sys.stderr))
    except SpecError as exc:
        print(f"{prog}: {exc}\nNothing was written. Fix the problems above and run again.", file=sys.stderr)
        return exc.exit_code
    except gd_config.ConfigError as exc:
        print(f"{prog}: {exc}\nNothing was written.", file=sys.stderr)
        return SkillBankError.exit_code
    except SkillBankError as exc:
        print(f"{prog}: {exc}\nNothing was written.", file=sys.stderr)
        return exc.exit_code
    try:
        return run_action(args.action, config)
    except ActionError as exc:
        print(f"{prog}: {exc}; nothing was run.", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
