"""The wheel works outside a checkout: built, installed into a fresh virtual environment and run from a folder the
checkout cannot be imported from, it finds its skill contract, schemas and templates, and runs a job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from importlib.metadata import version
from pathlib import Path

from sdk.skill_info import BANK_ROOT

REPO = Path(__file__).resolve().parents[1]
BANK_FOLDERS = ("skills", "schemas", "references", "examples")

# Run inside the installed copy: an evaluate job of the shipped base model on two generated images.
JOB_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import yaml

    from runner import base_model
    from sdk import SkillBank

    here = Path(sys.argv[1])
    paths = base_model.generate_data(here / "data", num_train=0, num_val=2)
    spec = base_model.eval_spec(paths["val_image_dir"], paths["val_json_file"], str(base_model.BASE_MODEL),
                                str(here / "preflight_results"))
    (here / "spec.yaml").write_text(yaml.safe_dump(spec))
    del spec["results_dir"]  # the SDK puts results in the job folder
    bank = SkillBank(here / "workspace")
    job = bank.wait(bank.create_job("evaluate", spec=spec).id, timeout=600)
    print(json.dumps({"path": str(job.path), "log": bank.logs(job.id)}))
""")


def test_checkout_links_its_bank_folders_to_the_top_level_ones():
    """Generated files live in one place: the package's entries are the repository's folders, not copies."""
    for name in BANK_FOLDERS:
        assert (BANK_ROOT / name).resolve() == REPO / name, f"grounding_dino_skillbank/{name} must link to {name}/"


def _run(args: list, cwd: Path, env: dict, expect: int = 0) -> str:
    done = subprocess.run([str(a) for a in args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == expect, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_installed_wheel_runs_outside_the_checkout(tmp_path):
    # Build folders go under tmp_path: setuptools never empties build/lib, so a stale one would leak removed files.
    (tmp_path / "setup.cfg").write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n"
                                        f"[egg_info]\negg_base = {tmp_path}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp_path / "dist"], REPO, {**env, "DIST_EXTRA_CONFIG": str(tmp_path / "setup.cfg")})
    wheel, = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p for folder in BANK_FOLDERS[:3] for p in (REPO / folder).rglob("*") if p.is_file()]
    shipped += [p for pattern in ("*.py", "*.yaml") for p in (REPO / "examples").glob(pattern)]
    missing = {f"grounding_dino_skillbank/{p.relative_to(REPO).as_posix()}" for p in shipped} - names
    assert not missing, f"the wheel lacks {sorted(missing)}"

    # A bare environment that borrows this one's dependencies through a .pth file (a path line there does not run
    # this environment's .pth files, so the editable install's import hook stays out) and gets the wheel itself.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env).strip())
    (site / "_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path, env)

    outside = tmp_path / "outside"
    outside.mkdir()
    # The CPU kernel's build cache is keyed by name: building it from the installed source would make the
    # checkout's next use rebuild it. The plain path gives the same results.
    env["GDINO_MSDA_KERNEL"] = "0"
    probe = ("import json, grounding_dino, grounding_dino_skillbank, runner, sdk; "
             "print(json.dumps([m.__file__ for m in (grounding_dino, grounding_dino_skillbank, runner, sdk)]))")
    files = json.loads(_run([python, "-c", probe], outside, env))
    assert all(Path(f).is_relative_to(site) for f in files), files

    release = version("grounding-dino-skillbank")
    assert _run([bin_dir / "skillbank", "--version"], outside, env) == f"skillbank {release}\n"
    assert _run([bin_dir / "grounding_dino", "--version"], outside, env) == f"grounding_dino {release}\n"
    assert "up to date" in _run([bin_dir / "skillbank", "schemas", "check"], outside, env)

    result = json.loads(_run([python, "-c", JOB_SCRIPT, outside], outside, env).splitlines()[-1])
    job_dir = Path(result["path"])
    record = json.loads((job_dir / "job.json").read_text())
    assert record["status"] == "done", result["log"][-3000:]
    assert job_dir.is_relative_to(outside) and "cannot read the skill contract" not in result["log"]
    assert list(job_dir.rglob("results.json"))

    spec = outside / "spec.yaml"
    assert "preflight evaluate: OK" in _run([bin_dir / "skillbank", "preflight", "-e", spec, "--action", "evaluate"],
                                            outside, env)
    refused = _run([bin_dir / "grounding_dino", "evaluate", "-e", spec, "model.backbone=resnet_999"], outside, env,
                   expect=2)
    assert "model.backbone" in refused and "Nothing was written" in refused
