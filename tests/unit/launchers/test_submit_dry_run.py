"""miles-submit --dry-run: golden output for quickstart and glm5, rendering of the Slurm flags, bad input."""

import re
import subprocess
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[3] / "sbatch" / "miles-het.sbatch"


def _section(out: str, title: str) -> str:
    return out.split(f"# ==== {title} ====\n", 1)[1].split("\n# ==== ", 1)[0]


@pytest.mark.parametrize("recipe", ["quickstart", "glm5"])
def test_dry_run_matches_golden(recipe, run_tool, assert_golden):
    proc = run_tool("submit", "--recipe", recipe, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert_golden(f"{recipe}.dry-run.txt", proc.stdout)


def test_rendered_scripts_are_valid_bash_with_the_recipe_layout(run_tool):
    out = run_tool("submit", "--recipe", "glm5", "--dry-run").stdout
    script = _section(out, "het-job script (sbatch)")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    group0, group1 = script.split("#SBATCH hetjob\n")
    assert re.findall(r"^#SBATCH --(nodes|ntasks-per-node|gpus-per-node)=(\d+)", group0, re.M) == [
        ("nodes", "8"), ("ntasks-per-node", "1"), ("gpus-per-node", "8")]
    assert re.findall(r"^#SBATCH --(nodes|ntasks-per-node|gpus-per-node)=(\d+)", group1, re.M) == [
        ("nodes", "16"), ("ntasks-per-node", "8"), ("gpus-per-node", "8")]
    assert "--exclusive" in group1 and "--time=48:00:00" in group1
    memory = _section(out, "memory")
    assert re.search(r"743\.\d\d B parameters", memory)
    for part in ("weights", "grads", "optimizer", "activations", "total"):
        assert re.search(rf"^  {part} +\d+\.\d GiB$", memory, re.M)
    assert "MLA (multi-head latent attention)" in _section(out, "support")


def test_plain_template_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(TEMPLATE)]).returncode == 0
    assert TEMPLATE.read_text().count("#SBATCH hetjob") == 1


def test_slurm_flags_become_cluster_overrides_and_sbatch_lines(run_tool):
    proc = run_tool("submit", "--recipe", "quickstart", "--dry-run", "--partition", "gpu", "--account", "proj",
                    "--qos", "high", "--time", "04:00:00", "--constraint", "h100", "--exclusive",
                    "--container-image", "nvcr.io/x/miles:1", "--sbatch-extra=--mail-type=END",
                    "--sbatch-extra=#SBATCH --reservation=r1", "--nodes-train", "2", "--gpus-per-node", "4",
                    "--bootstrap", "mpi", "run.num_steps=3")
    assert proc.returncode == 0, proc.stderr
    script = _section(proc.stdout, "het-job script (sbatch)")
    group0, group1 = script.split("#SBATCH hetjob\n")
    for line in ("--partition=gpu", "--account=proj", "--qos=high", "--time=04:00:00", "--constraint=h100",
                 "--exclusive", "--gpus-per-node=4"):
        assert f"#SBATCH {line}\n" in group0 and f"#SBATCH {line}\n" in group1
    assert "#SBATCH --mail-type=END\n#SBATCH --reservation=r1\n" in group0
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4\n" in group1
    assert "CONTAINER=(--container-image=nvcr.io/x/miles:1 " in script
    assert "OVERRIDES=(run.num_steps=3 cluster.partition=gpu cluster.account=proj " in script
    assert "'cluster.time=\"04:00:00\"'" in script
    config = _section(proc.stdout, "resolved config")
    assert "  time: 04:00:00" in config or "  time: '04:00:00'" in config
    assert "  bootstrap: mpi" in config and "  nodes_train: 2" in config


def test_unknown_recipe_lists_the_known_ones(run_tool):
    proc = run_tool("submit", "--recipe", "glm6", "--dry-run")
    assert proc.returncode == 2
    assert "no recipe named 'glm6'; did you mean 'glm5'?" in proc.stderr
    assert re.search(r"Known recipes: .*glm5, .*quickstart, .*qwen3-small", proc.stderr)


def test_unknown_override_key_lists_the_valid_keys(run_tool):
    proc = run_tool("submit", "--recipe", "quickstart", "--dry-run", "cluster.nodes=2")
    assert proc.returncode == 2
    assert "unknown key 'cluster.nodes'" in proc.stderr and "Valid keys of cluster: nodes_rollout, nodes_train" in proc.stderr


def test_real_glm5_run_stops_before_submitting_and_names_the_missing_pieces(run_tool, tmp_path):
    for executor in ("slurm", "local"):
        proc = run_tool("submit", "--recipe", "glm5", "--executor", executor)
        assert proc.returncode == 2, proc.stderr
        assert "nothing was submitted" in proc.stderr
        for piece in ("MLA (multi-head latent attention)", "DSA sparse attention", "pipeline parallelism"):
            assert piece in proc.stderr
    assert not (tmp_path / "runs").exists()  # no submitit folder, no run directory: nothing was allocated


def test_missing_model_is_caught_before_submitting(run_tool):
    proc = run_tool("submit", "--recipe", "qwen3-small")
    assert proc.returncode == 2
    assert "model.path='/path/to/Qwen3-1.7B' holds no config.json" in proc.stderr


def test_cli_surface_is_pinned(run_tool, assert_golden):
    """Ratchet: the option strings of miles-submit (regenerate with UPDATE_GOLDEN=1 on purpose)."""
    from miles.launchers.submit import build_parser

    options = sorted(s for a in build_parser()._actions for s in a.option_strings)
    assert_golden("miles-submit.options.txt", "\n".join(options) + "\n")
