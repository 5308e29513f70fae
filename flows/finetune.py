"""The fine-tuning step as its own flow, deployed on a GPU work pool (see prefect.yaml).

The pipeline calls it with ``run_deployment`` so training runs in a separate process on a GPU worker:
Prefect timeouts cannot stop a sync task running in a thread, and an OOM-killed trainer must not take the
orchestrating flow with it. Inputs and outputs are paths under the shared workspace (the local process
pool shares the filesystem; a Kubernetes job pulls/pushes them through the DVC remote, see
docs/pipeline.md). The device is chosen automatically: CUDA when present, else CPU.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger

from flows.logs import with_library_logs
from spf.pipeline.params import PipelineParams
from spf.pipeline.stages import STAGE_TABLE, run_stage


@flow(name="spf-finetune", log_prints=True)
@with_library_logs
def spf_finetune(
    params: dict[str, Any], workspace: str = ".", dvc_remote: str | None = None
) -> dict[str, Any]:
    """Fine-tune the aligned base (vanilla or SPF) with the pipeline's effective parameters."""
    log = get_run_logger()
    os.chdir(workspace)
    p = PipelineParams.from_dict(params, source="spf-finetune parameters")
    import torch

    log.info("device: %s", p.runtime.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = STAGE_TABLE["finetune"].inputs
    if dvc_remote and not all(os.path.isdir(p.stage_dir(folder)) for folder in inputs):
        from tasks import dvc_ops  # a worker without the shared filesystem: fetch the inputs

        producers = [name for name, row in STAGE_TABLE.items() if row.output in inputs]
        dvc_ops.dvc_pull(".", dvc_remote, producers)  # retried with backoff
    result = run_stage("finetune", p)
    if dvc_remote:
        from tasks import dvc_ops

        dvc_ops.dvc_commit(".", ["finetune"])
        dvc_ops.dvc_push(".", dvc_remote, ["finetune"])
    return result
