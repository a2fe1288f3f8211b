"""Process groups end with the command that made them (int4_qat.cli, int4_qat.parallel).

A gloo group alive at interpreter exit can abort a process that succeeded ("terminate called
without an active exception"): `tools/export.py --nproc 2` did so in 11 of 72 runs. Two causes,
two rules: the CLI wrapper destroys the groups its command created, and our one
`init_process_group` imports torch.distributed.nn.functional first so that no late import
(torch._dynamo, pulled in by compressed-tensors) captures the group in a default argument.
Each case runs in a fresh interpreter: what matters is import order and threads at exit.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from int4_qat.testing import REPO_ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")

_PRELUDE = """
import glob, os, sys
import torch.distributed as dist
from int4_qat.parallel import free_port

def gloo_threads():
    return sum(open(f).read().strip() == "pt_gloo_runloop" for f in glob.glob("/proc/self/task/*/comm"))

def kw():
    return dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

def collective():
    out = [None]; dist.all_gather_object(out, {"rank": 0})
"""


def _run(body: str) -> str:
    p = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_a_late_torch_import_does_not_keep_the_group_alive():
    # control: torch's own init, then the late import -> the group outlives its destroy
    plain = _run("""
        dist.init_process_group("gloo", **kw()); collective()
        import compressed_tensors  # the real late import: torch._dynamo -> torch.distributed.nn
        dist.destroy_process_group()
        print(gloo_threads())
    """)
    assert int(plain) > 0, plain        # the failure mode is real with the pinned torch
    # ours: the same sequence frees the group and joins its threads
    ours = _run("""
        from int4_qat.parallel import init_process_group
        init_process_group("gloo", **kw()); collective()
        import compressed_tensors
        before = gloo_threads()
        dist.destroy_process_group()
        print(before, gloo_threads())
    """)
    before, after = map(int, ours.split())
    assert before > 0 and after == 0, ours


def test_cli_destroys_the_groups_its_command_created():
    out = _run("""
        from int4_qat import cli
        from int4_qat.parallel import init_process_group

        def command():
            init_process_group("gloo", **kw()); collective()
            import compressed_tensors  # noqa: F401
            return 0

        def failing():
            init_process_group("gloo", **kw()); collective()
            raise ValueError("bad input")

        print("ok", cli.run_cli(command, "prog", []), dist.is_initialized(), gloo_threads())
        print("fail", cli.run_cli(failing, "prog", []), dist.is_initialized(), gloo_threads())
        # a group the caller owns is left alone
        init_process_group("gloo", **kw())
        print("caller", cli.run_cli(lambda: collective(), "prog", []), dist.is_initialized())
        dist.destroy_process_group()
    """)
    assert out.split("\n")[:3] == ["ok 0 False 0", "fail 2 False 0", "caller 0 True"], out
