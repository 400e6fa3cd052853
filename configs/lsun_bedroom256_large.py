"""The paper's larger LSUN Bedroom model: about 256M parameters, 1.15M steps (Ho et al. 2020 App. B).

The paper says only that it has "approximately 256 million parameters by increasing filter count"
and the official code has no such model; ch = 192 in the 114M architecture gives 255,677,955
parameters (ch 128 -> 113.7M, 256 -> 454M), so this is configs/lsun_bedroom256.py with ch 192.
Memory per device: docs/data.md. On a TPU v4-32 pod slice (4 hosts):
    launch/create_vm.sh --accelerator=v4-32 --spot
    launch/setup_vm.sh --worker=all
    launch/train.sh --worker=all --config=configs/lsun_bedroom256_large.py \
        --workdir=gs://BUCKET/runs/bedroom256_large -- --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.load_config_file("lsun_bedroom256.py", relative_to=__file__)
    c.model.ch = 192
    c.training.num_train_steps = 1_150_000
    return c
