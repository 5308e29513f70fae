"""The pipeline: typed ``params.yaml``, the stage functions DVC and Prefect run, and the promotion gate."""
