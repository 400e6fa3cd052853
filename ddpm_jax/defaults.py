"""Every config field ddpm_jax reads, with the DDPM CIFAR-10 values (Ho et al. 2020) as defaults.

The runnable configs in the repository's `configs/` start from `get_config()` and change what
differs; `load_config_file` reads one of them by path (a config built on another loads it so).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar10"  # any tfds name with an 'image' feature; 'digits', 'faces' ship offline;
    # 'folder': the images in data.data_dir (sub-folders are classes), see docs/data.md
    c.data.split = "train"
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    # 'folder' only: where its prepared copy goes; None: data_dir/.ddpm_jax_cache
    c.data.cache_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True
    # > 0: each training image is made this size square (centre crop, resize), then a random
    # image_size crop of it is taken (super-resolution on large images: detail at this scale,
    # the low-res input made from the crop); 0: the whole image at image_size.
    c.data.random_crop = 0
    c.data.shuffle_buffer = 50_000
    # Text models: the caption feature (a Text, or a Sequence of Text of which one is drawn per
    # example per epoch, e.g. coco_captions' 'captions/text') and the most byte tokens kept, BOS
    # included (longer captions are cut at a character boundary).
    c.data.text_feature = "caption"
    c.data.max_text_len = 64
    # Precomputed-embedding models with model.text_encoder_path: True reads the captions instead of
    # stored embeddings and embeds each batch with that frozen T5 on the devices as it trains (any
    # captioned dataset, e.g. coco_captions, or a folder of NAME.txt; no `embed` step).
    c.data.embed_captions = False

    c.model = ml_collections.ConfigDict()
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.model.num_classes = 0  # 0: unconditional; >0: class-conditional with a null class
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.attention = "xla"  # attention kernel: xla | cudnn (NVIDIA GPU, bfloat16/float16 compute)
    c.model.attn_position = False  # 2D position embedding on attention queries and keys (text: relations)
    c.model.coord_channels = False  # row and column as two more input channels (CoordConv; text: relations)
    c.model.remat = False  # recompute each block's activations in the backward pass: less memory, more time
    # Text conditioning: none | trained (ddpm_jax.text.TextEncoder on byte tokens, trained with the
    # U-Net) | precomputed (the dataset's 'text_emb' [L, D] and 'text_mask' [L], any frozen encoder).
    c.model.text_encoder = "none"
    c.model.text_width = 256  # width of the text tokens the U-Net attends to
    c.model.text_depth = 4  # trained encoder: Transformer blocks
    c.model.text_heads = 4  # trained encoder: attention heads
    c.model.text_attention = "fused"  # fused: text keys/values appended to self-attention's; cross: separate
    c.model.text_emb_dim = 0  # precomputed: D of the dataset's embeddings (projected to text_width)
    c.model.text_encoder_path = ""  # precomputed: a frozen T5's folder (ddpm_jax.t5); prompts are embedded by it
    # The frozen T5's weights: '' as stored, or cast once as loaded to 'bfloat16' (a float32 checkpoint
    # in half the memory on every device; products stay float32) or 'float32'.
    c.model.text_encoder_dtype = ""
    # The frozen T5 split over groups of this many local devices (its heads and feed-forward units; each
    # group embeds its share of the texts): 1/shards of its memory per device; 1: a copy on each device.
    c.model.text_encoder_shards = 1
    # Super-resolution (ddpm_jax.superres): > 0 conditions on the image downsampled to this size,
    # resized back with low_res_resize (bicubic | nearest | bilinear) and concatenated on channels.
    c.model.low_res_size = 0
    c.model.low_res_resize = "bicubic"
    # The guidance weight w as an input, cond['guidance'] (Meng et al. 2023): a student that learnt its
    # teacher's classifier-free guidance for every w in [distill.guidance_min, distill.guidance_max] and
    # samples guided in one network evaluation a step (configs/distill_guidance.py).
    c.model.guidance_embedding = False
    # The U-Net's details: Ho et al.'s by default; Improved DDPM / ADM (Nichol & Dhariwal 2021, Dhariwal &
    # Nichol 2021; configs/cifar10_improved.py) and diffusers' UNet2DModel defaults use the alternatives.
    c.model.attn_head_dim = 0  # 0: one attention head of all channels; > 0: heads of this many channels (ADM: 64)
    c.model.scale_shift_norm = False  # the timestep embedding scales and shifts the second GroupNorm (AdaGN)
    c.model.resblock_updown = False  # BigGAN-style residual blocks that resample, instead of strided / upsampling convs
    c.model.time_embedding = "ddpm"  # ddpm: [sin, cos], 10000^(-i/(d/2-1)) | adm: [cos, sin], 10000^(-i/(d/2))
    c.model.norm_eps = 1e-6  # GroupNorm's epsilon: 1e-6 as TensorFlow's group_norm; PyTorch code uses 1e-5
    c.model.downsample_padding = "same"  # the strided conv: same (TF: 0 before, 1 after) | symmetric (PyTorch's 1)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_schedule = "linear"
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.model_output = "eps"  # eps | x0 | v
    c.diffusion.variance = "fixedlarge"  # fixedlarge | fixedsmall | learned_range (2C outputs, L_hybrid)
    c.diffusion.vlb_weight = 0.001  # learned_range: lambda of L_hybrid = L_simple + lambda L_vlb
    c.diffusion.loss_weighting = "none"  # none (L_simple) | min_snr: Min-SNR-gamma (Hang et al. 2023)
    c.diffusion.min_snr_gamma = 5.0  # min_snr: the x_0 error weighted by min(SNR_t, gamma); 5 in the paper
    # Super-resolution: training noises the low-res image to a level ~ U[0, this] (superres.augment;
    # on the linear schedule 0.15 is abar 0.79, 0.5 is 0.08: docs/super_resolution.md).
    c.diffusion.low_res_aug_max = 0.15
    # Rescale the schedule to zero terminal SNR (Lin et al. 2024): x_T is pure noise, as sampling
    # starts. Needs model_output 'v' (x0 from eps divides by sqrt(abar_T) = 0) and the ancestral or
    # ddim sampler (the others step in log sigma, infinite at T).
    c.diffusion.zero_terminal_snr = False
    c.diffusion.clip_x0 = True  # clip x0 predictions to [-1, 1] (bits/dim; sampling unless sampling.threshold)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    # 0: constant after warmup (Ho et al.); N: cosine decay to 0 at step N (>= training.num_train_steps)
    c.optim.decay_steps = 0
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.ema_decay = 0.9999

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 128  # global, over all devices and hosts
    c.training.num_train_steps = 800_000
    c.training.steps_per_call = 1  # train steps fused into one device call with lax.scan
    c.training.grad_accum_steps = 1  # microbatches per device whose gradients are averaged into one step
    c.training.label_dropout = 0.1  # P(label -> null class) when model.num_classes > 0
    c.training.text_dropout = 0.1  # P(text -> the null text) when model.text_encoder != 'none'
    c.training.nonfinite = "stop"  # a non-finite loss/gradient: stop (exit 1, nothing saved) | skip the step
    c.training.log_every = 100
    c.training.checkpoint_every = 5000
    c.training.keep_checkpoints = 3
    # Multi-process runs: the processes agree on a stop request (SIGTERM, Ctrl-C on any of them) at
    # least this often, in steps; each check waits for the devices (single process: every call).
    c.training.stop_check_every = 10
    # Resume even where model.*, diffusion.*, data.* (but data.data_dir) or seed differ from the run's
    # config.json (checkpoints.check_resume_config); the change is recorded either way.
    c.training.allow_config_change = False
    c.training.sample_every = 20_000  # EMA sample grid to DIR/samples and TensorBoard; 0: none
    c.training.num_sample_images = 64
    c.training.profile_steps = 5  # steps in each profile (first soon after start, then hourly); 0: none

    c.sampling = ml_collections.ConfigDict()  # `python -m ddpm_jax.sample` (its flags set these)
    # a name in ddpm_jax.sampling.SAMPLERS: ancestral | ddim | dpm_solver++ | heun | ode
    c.sampling.sampler = "ancestral"
    c.sampling.steps = 1000  # fewer than diffusion.num_timesteps: respaced (Nichol & Dhariwal 2021); heun: evaluations
    # the timesteps of a respaced chain: even (both ends, 0 and T-1) | trailing (Lin et al. 2024: T/steps - 1
    # up to T-1; steps as long near the clean image as elsewhere; what distilled students sample with)
    c.sampling.timestep_spacing = "even"
    c.sampling.eta = 0.0  # ddim: 0 deterministic, 1 the ancestral (posterior) variance
    c.sampling.threshold = "auto"  # x0 predictions: none | clip | dynamic (Imagen); auto: as diffusion.clip_x0
    c.sampling.threshold_percentile = 0.995  # dynamic: s = max(1, this quantile of |x0| per sample)
    c.sampling.s_churn = 0.0  # heun: EDM's stochastic churn; 0 deterministic
    c.sampling.s_tmin = 0.0  # heun: churn only where s_tmin <= sigma <= s_tmax
    c.sampling.s_tmax = float("inf")
    c.sampling.s_noise = 1.0  # heun: scale of the churn noise
    c.sampling.ode_tolerance = 1e-5  # ode: the solver's rtol = atol (score_sde's 1e-5)
    c.sampling.guidance = 0.0  # classifier-free guidance weight w (class- or text-conditional models)
    # w only where guidance_t_min <= t <= guidance_t_max (model timesteps), the conditional model alone
    # elsewhere: guidance in a limited interval (Kynkaanniemi et al. 2024)
    c.sampling.guidance_t_min = 0.0
    c.sampling.guidance_t_max = float("inf")
    # phi of guidance rescale (Lin et al. 2024, Eq. 15-16): the guided output's std per sample brought
    # to the conditional output's, mixed phi : 1 - phi with the guided one (0: off; they use 0.7)
    c.sampling.guidance_rescale = 0.0
    # Autoguidance (Karras et al. 2024): guidance's negative half from this run, a weaker version of the
    # model (the same config trained for fewer steps, or smaller), under the same condition, instead
    # of from the model itself under the null condition; '' = classifier-free guidance.
    c.sampling.guide_workdir = ""
    c.sampling.guide_checkpoint_step = 0  # the guide run's checkpoint of this step (0: its newest)
    c.sampling.aug_level = 0.1  # super-resolution: the level the low-res input is noised to (0: none)
    # super-resolution: 1 starts from pure noise (SR3); below 1, from the input upsampled and noised to
    # t = sr_strength * T (SDEdit), which the CPU-trained shapes_sr needs (docs/super_resolution.md)
    c.sampling.sr_strength = 1.0
    c.sampling.strength = 0.5  # image-to-image (SDEdit): start from t = strength * T
    # --mask=auto, DiffEdit (Couairon et al. 2022): |eps(target) - eps(reference)| of the inputs noised
    # to t = mask_strength * T, averaged over mask_draws draws, >= mask_threshold of its maximum, grown
    # by mask_dilation pixels
    c.sampling.mask_strength = 0.5
    c.sampling.mask_draws = 10
    c.sampling.mask_threshold = 0.5
    c.sampling.mask_dilation = 0
    c.sampling.jump_length = 0  # inpainting (RePaint): resampling jump length in steps; 0: none
    c.sampling.jump_n_sample = 1  # inpainting: times each jump stretch is sampled
    c.sampling.num_frames = 10  # steps shown in the forward/reverse process figures
    c.sampling.num_samples = 64  # images per `python -m ddpm_jax.sample`
    c.sampling.batch_size = 256  # images per device call, over all local devices
    c.sampling.seed = 0  # the noise: the same seed gives the same images

    # Progressive distillation (Salimans & Ho 2022; ddpm_jax.distillation, docs/samplers.md): with a teacher,
    # training starts from the teacher's EMA params and teaches the student to take in one deterministic DDIM
    # step (sampling.sampler='ddim', eta 0, 'trailing' spacing) what the teacher takes in two: the student
    # samples in sampling.steps steps where the teacher took twice as many.
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # a training run's --workdir (a DDPM, or a student of twice sampling.steps); '': none
    c.distill.teacher_checkpoint_step = 0  # the teacher's checkpoint of this step (0: its newest, recorded)
    # progressive: halve the teacher's steps (above) | guidance: Meng et al. 2023's first stage, the guided
    # teacher's output at every timestep (one network evaluation where guidance takes two; any sampler)
    c.distill.mode = "progressive"
    # Class- or text-conditional teachers: their classifier-free guidance weight w. The student learns the
    # guided teacher's steps under its own condition, so it samples guided with sampling.guidance = 0.
    c.distill.guidance = 0.0
    # A student with model.guidance_embedding learns every w in [guidance_min, guidance_max] instead (drawn
    # per example) and samples guided with sampling.guidance = w; later rounds keep the range.
    c.distill.guidance_min = 0.0
    c.distill.guidance_max = 4.0

    c.eval = ml_collections.ConfigDict()  # in-loop evaluation and `python -m ddpm_jax.evaluate` (its flags set these)
    c.eval.eval_every = 0  # 0: no in-loop evaluation
    c.eval.num_samples = 1000  # samples for FID/IS/KID and the digits metrics; 0: none
    c.eval.steps = 0  # sampler steps for those samples; 0: sampling.steps
    c.eval.batch_size = 256  # images per device call, over all local devices (sampling and bpd)
    c.eval.seed = 0  # sampling and bound noise: the same at every evaluation, so curves carry no sampling noise
    c.eval.bpd_examples = 0  # bits/dim on this many examples of eval.split; 0: none (in-loop)
    # bits/dim by 'vlb', the paper's variational bound (Eq. 5), or 'ode', the probability-flow ODE
    # (Song et al. 2021) with uniform dequantisation, solved to eval.ode_tolerance (rtol = atol; theirs
    # 1e-5) from noise level eval.ode_sigma_min (0: the model's smallest, timestep 0's; below it the
    # network is told timestep 0)
    c.eval.bpd_method = "vlb"
    c.eval.ode_tolerance = 1e-5
    c.eval.ode_sigma_min = 0.0
    c.eval.split = ml_collections.FieldReference(None, field_type=str)  # None: 'test' if any, else data.split
    # FID/IS: the .npz from `evaluate convert_inception` and one from `evaluate reference_stats` (or
    # pytorch-fid's statistics file); both or neither.
    c.eval.inception_weights = ml_collections.FieldReference(None, field_type=str)
    c.eval.reference_stats = ml_collections.FieldReference(None, field_type=str)
    c.eval.digits_classifier = ml_collections.FieldReference(None, field_type=str)  # None: ~/.cache/ddpm_jax/
    c.eval.clip_model = ""  # `evaluate clip`: a CLIP checkpoint's folder (ddpm_jax.evaluation.clip)
    return c


def load_config_file(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path` (relative to the folder of the file `relative_to`);
    `FILE.py:ARG` calls `get_config(ARG)`, as ml_collections' --config flag does."""
    path, colon, arg = path.partition(":")
    if relative_to:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([arg] if colon else []))
