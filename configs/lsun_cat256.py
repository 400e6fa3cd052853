"""DDPM on LSUN Cat 256x256, the official recipe (Ho et al. 2020 App. B; `scripts/run_lsun.py`).

The CelebA-HQ model and optimiser (configs/celebahq256.py: 114M params, Adam 2e-5, batch 64, EMA
0.9999, dropout 0.0) on tfds's `lsun/cat`, 1.8M steps, without flips as the official launch command
(`--randflip 0`; the paper's App. B lists flips for every dataset but bedroom). On a TPU v4-32
pod slice (4 hosts):
    launch/create_vm.sh --accelerator=v4-32 --spot
    launch/setup_vm.sh --worker=all
    launch/train.sh --worker=all --config=configs/lsun_cat256.py --workdir=gs://BUCKET/runs/cat256 \
        -- --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.load_config_file("celebahq256.py", relative_to=__file__)
    c.data.dataset = "lsun/cat"
    c.data.random_flip = False
    c.training.num_train_steps = 1_800_000
    return c
