"""Prefect flows: ``spf_pipeline`` (the whole DAG) and ``spf_finetune`` (the GPU step, its own deployment)."""
