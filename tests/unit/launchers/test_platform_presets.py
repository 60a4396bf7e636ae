"""miles-submit --platform: golden job scripts per preset, the glm5 gb200 dry run, and the preset files' contract."""

import re
import subprocess

import pytest

from miles.cluster.platforms import PLATFORMS


def _section(out: str, title: str) -> str:
    return out.split(f"# ==== {title} ====\n", 1)[1].split("\n# ==== ", 1)[0]


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_platform_preset_script_matches_golden(platform, run_tool, assert_golden):
    proc = run_tool("submit", "--recipe", "qwen3-small", "--platform", platform, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = _section(proc.stdout, "het-job script (sbatch)")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert PLATFORMS[platform].preset_text().rstrip("\n") in script  # the preset file is inlined verbatim
    assert_golden(f"platform-{platform}.sbatch", script + "\n")


def test_glm5_on_gb200_dry_run_matches_golden(run_tool, assert_golden):
    proc = run_tool("submit", "--recipe", "glm5", "--platform", "gb200", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = _section(proc.stdout, "het-job script (sbatch)")
    group0, group1 = script.split("#SBATCH hetjob\n")
    # 16 x 8 trainer GPUs and one 64-GPU engine become 32 + 16 GB200 nodes of 4 GPUs; each segment fits a rack.
    assert re.findall(r"^#SBATCH --(nodes|gpus-per-node|segment)=(\d+)", group0, re.M) == [
        ("nodes", "16"), ("gpus-per-node", "4"), ("segment", "16")]
    assert re.findall(r"^#SBATCH --(nodes|gpus-per-node|segment)=(\d+)", group1, re.M) == [
        ("nodes", "32"), ("gpus-per-node", "4"), ("segment", "8")]
    assert "export NCCL_MNNVL_ENABLE=${NCCL_MNNVL_ENABLE:-1}" in script
    assert "--segment=8 of the trainer group does not divide the 18-node domain" in _section(proc.stdout, "placement")
    assert_golden("glm5-gb200.dry-run.txt", proc.stdout)


def test_one_imex_channel_per_segment_and_explicit_flags_win(run_tool):
    proc = run_tool("submit", "--recipe", "glm5", "--platform", "gb300", "--imex-channel-per-segment",
                    "--nodes-train", "64", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = _section(proc.stdout, "het-job script (sbatch)")
    assert script.count("#SBATCH --network=unique-channel-per-segment\n") == 2  # both het groups
    assert "cluster.nodes_train=64" in script and "cluster.nodes_train=32" not in script
    assert "#SBATCH --nodes=64\n" in script.split("#SBATCH hetjob\n")[1]
    proc = run_tool("submit", "--recipe", "glm5", "--platform", "h100", "--imex-channel-per-segment", "--dry-run")
    assert proc.returncode == 2 and "imex_channel_per_segment needs a platform that uses IMEX" in proc.stderr


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_preset_files_cite_a_source_for_every_variable_and_yield_to_the_site(platform, tmp_path):
    text = PLATFORMS[platform].preset_text()
    lines = text.splitlines()
    exports = [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"export (\w+)=", line))]
    assert exports, f"{platform} exports nothing"
    for i, name in exports:
        comment = []
        for line in reversed(lines[:i]):
            if not line.startswith("#"):
                break
            comment.insert(0, line)
        block = "\n".join(comment)
        assert name in block and re.search(r"docs|guide", block), f"{platform}: {name} has no cited source"
        assert re.match(rf"export {name}=\$\{{{name}:-[^}}]+\}}$", lines[i]), f"{platform}: {name} overrides the site"
    names = [name for _, name in exports]
    env = {"PATH": "/usr/bin:/bin", names[0]: "site-value"}
    out = subprocess.run(["bash", "-c", f'source "$1"; for v in {" ".join(names)}; do echo "$v=${{!v}}"; done', "_",
                          str(PLATFORMS[platform].preset_path())], env=env, capture_output=True, text=True, check=True)
    got = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert got[names[0]] == "site-value" and all(got[n] for n in names)
