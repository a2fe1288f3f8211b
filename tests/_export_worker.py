"""torchrun worker for tests/test_export_stream.py: save training checkpoints under many layouts
and export each live model in the same job.

``python -m torch.distributed.run --nproc-per-node N tests/_export_worker.py SPEC.json`` runs, for
every job of the spec in turn (one process group, Megatron's parallel state rebuilt per job): a
:class:`int4_qat.train.Trainer` for the job's recipe (tiny model, the job's TP/EP/PP/DP, weights
imported from an HF checkpoint so every layout holds the same model), one save (model, optimizer,
ModelOpt state), then the collective export of the *live* model
(:func:`int4_qat.export.live_source.export_live`) into ``<out>/live``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_job(job: dict) -> str:
    import _dist_worker as W
    from int4_qat.checkpoint import _unwrap
    from int4_qat.export.live_source import export_live
    from int4_qat.train import Trainer

    from int4_qat.recipe import Recipe

    recipe = W.tiny_recipe(job["model"], data=[job["corpus"]], fmt=job["fmt"], scope=job["scope"],
                           parallel=job["parallel"], **job.get("train", {}))
    if job.get("config"):   # a variant of the tiny config (e.g. more layers for an even PP split)
        d = recipe.to_dict()
        d["model"]["config"] = job["config"]
        recipe = Recipe.from_dict(d)
    tr = Trainer(recipe, cpu=True, quant=job.get("quant", True), init_from=job["hf"], out=job["out"],
                 resume=False, log=lambda s: None)
    ckpt = tr.save()
    if job.get("live", True):
        export_live(_unwrap(tr.model), tr.arch, str(Path(job["out"]) / "live"), recipe.quant.scheme(),
                    progress=False, max_shard_bytes=job.get("max_shard_bytes", 2 * 10**9))
    return str(ckpt)


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    spec = json.loads(Path(argv[0]).read_text())
    done = [run_job(job) for job in spec["jobs"]]
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(done))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
