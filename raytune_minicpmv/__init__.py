"""raytune_minicpmv: fine-tune MiniCPM-V vision-language models on a Ray cluster.

Stages (each a module with one entry function): `pipeline.run_preprocess` (Ray Data), `train.run_train`
(Ray Train + DeepSpeed), `tune.run_tune` (Ray Tune + ASHA), `merge.run_merge` (a Ray task), `jobs` (Ray Jobs).
The command line is `raytune-minicpmv` (see `cli.py`).
"""
__version__ = "0.1.0"
