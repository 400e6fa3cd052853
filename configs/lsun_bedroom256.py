"""DDPM on LSUN Bedroom 256x256, the official recipe (Ho et al. 2020 App. B; `scripts/run_lsun.py`).

The CelebA-HQ model and optimiser (configs/celebahq256.py: 114M params, Adam 2e-5, batch 64, EMA
0.9999, dropout 0.0) on tfds's `lsun/bedroom` (the full 3,033,042-image training set, as the official
`bedroom-full` records), 2.4M steps. Random flips as the official launch command (its default
randflip=1); the paper's App. B says bedroom was trained without flips:
--config.data.random_flip=False for that. configs/lsun_bedroom256_large.py is the paper's larger
(256M) bedroom model. On a TPU v4-32 pod slice (4 hosts):
    launch/create_vm.sh --accelerator=v4-32 --spot
    launch/setup_vm.sh --worker=all
    launch/train.sh --worker=all --config=configs/lsun_bedroom256.py --workdir=gs://BUCKET/runs/bedroom256 \
        -- --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.load_config_file("celebahq256.py", relative_to=__file__)
    c.data.dataset = "lsun/bedroom"
    c.data.random_flip = True
    c.training.num_train_steps = 2_400_000
    return c
