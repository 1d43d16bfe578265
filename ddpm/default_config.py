"""Base configuration: every experiment config starts from `get_config()` here.

configs/default.py re-exports it, so the configs in configs/ and any Python user start from the
same defaults, and `config_validation` checks configs against them (every key of a config must
exist here, with a value of the same type).

The field names below are the public contract of the codebase (the README documents them).
Override any of them from the command line, e.g.
  python launch.py --config=configs/digits.py --workdir=runs/d --config.training.batch_size=64
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- data -------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "digits"          # digits | folder | a TFDS name (mnist, cifar10, celeb_a, ...)
  data.path = ""                   # folder of images when dataset == "folder"
  data.tfds_data_dir = ""          # TFDS data_dir ("" = TFDS default)
  data.image_size = 16             # images are centre-cropped / resized to this (square)
  data.channels = 1                # 1 (grey) or 3 (RGB)
  data.random_flip = False         # random horizontal flip of training images
  data.num_classes = 0             # > 0 when labels are used (class-conditional models)
  data.prefetch = 2                # batches prefetched onto the devices
  data.num_workers = 0             # grain worker processes (0 = in the main process)

  # ---- model ------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"
  model.ch = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (8,)    # spatial resolutions (in pixels) with self-attention
  model.dropout = 0.0
  model.resamp_with_conv = True
  model.num_heads = 1
  model.num_head_channels = -1     # > 0 overrides num_heads (ADM)
  model.use_scale_shift_norm = False
  model.resblock_updown = False
  model.norm_groups = 0            # > 0: groups of every GroupNorm; 0: 32, fewer below 64 channels
  model.class_dropout = 0.0        # label drop rate for classifier-free guidance training
  model.remat = False              # nn.remat the residual blocks (memory for compute)
  model.cpu_kernels = True         # on CPU: XLA:CPU-tuned layers (ddpm/models/cpu_ops.py), same
                                   # parameters and values; ignored on GPU / TPU
  # Details in which improved-diffusion's UNetModel differs from DDPM's U-Net (the defaults are
  # DDPM's; configs/cifar10_improved.py sets improved-diffusion's, to load its checkpoints):
  model.rescale_timesteps = False  # True: the network sees t * 1000 / diffusion.num_timesteps
  model.timestep_embedding = "ddpm"  # ddpm: [sin, cos], freqs exp(-ln(1e4) i / (dim/2 - 1));
                                     # adm: [cos, sin], freqs exp(-ln(1e4) i / (dim/2))
  model.norm_eps = 1e-6            # GroupNorm epsilon: 1e-6 in DDPM's TF code, 1e-5 in torch
  model.downsample_padding = "same"  # stride-2 conv: same = TF's (0 before, 1 after);
                                     # symmetric = 1 on each side (torch padding=1)

  # ---- diffusion --------------------------------------------------------------------------
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = "linear"  # linear | cosine | quadratic | sigmoid | geometric | jsd
  diffusion.model_mean_type = "eps"   # eps | x0 | v
  diffusion.model_var_type = "fixed_large"  # fixed_large | fixed_small | learned | learned_range
  diffusion.loss_type = "mse"         # mse | l1 | huber | kl | hybrid
  diffusion.hybrid_lambda = 0.001     # weight of L_vlb in the hybrid loss (Improved DDPM)
  diffusion.min_snr_gamma = 0.0       # > 0: min-SNR-gamma loss weighting (Hang et al. 2023)
  diffusion.timestep_sampler = "uniform"  # uniform | loss_aware

  # ---- training ---------------------------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 64         # global batch size, over all devices and processes
  training.num_train_steps = 10_000
  training.log_every = 100
  training.checkpoint_every = 1000
  training.sample_every = 0        # > 0: write an EMA sample grid every so many steps
  training.keep_checkpoints = 3
  training.steps_per_dispatch = 1  # optimizer steps per compiled call (lax.scan)
  training.compute_dtype = "float32"  # float32 | bfloat16 (parameters stay float32)
  training.ema_decay = 0.9999
  training.ema_warmup = False      # decay min(ema_decay, (1 + n) / (10 + n))

  # ---- optimizer --------------------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "adam"         # adam | adamw
  optim.lr = 2e-4
  optim.warmup = 5000              # linear learning-rate warm-up steps
  optim.schedule = "constant"      # constant | cosine (decay to 0 at num_train_steps)
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.grad_clip = 1.0            # global-norm clipping (0 = off)
  optim.grad_accum_steps = 1       # > 1: optax.MultiSteps gradient accumulation

  # ---- sampling ---------------------------------------------------------------------------
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "ddpm"         # ddpm | ddim | heun
  sampling.num_steps = 0           # 0 = all num_timesteps steps
  sampling.num_samples = 64
  sampling.batch_size = 64         # per sampling call, over all devices
  sampling.eta = 0.0               # DDIM eta
  sampling.spacing = "uniform"     # uniform | quadratic timestep spacing for DDIM
  sampling.clip_denoised = True
  sampling.guidance_scale = 0.0    # classifier-free guidance (class-conditional models)
  sampling.intermediate_every = 0  # > 0: also keep every k-th x_t (for animations)

  # ---- evaluation -------------------------------------------------------------------------
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_samples = 1000    # samples for FID / IS
  evaluation.reference_num_images = 0  # training images for the FID reference statistics
                                       # (0 = the whole training split)
  evaluation.bpd_num_images = 256  # test images for bits/dim (full T-step bound)
  evaluation.batch_size = 64
  evaluation.feature_extractor = "inception"  # inception | none
  evaluation.inception_weights = ""           # local .npz/.pth of the FID Inception weights

  # ---- benchmark (launch.py --mode=benchmark) ---------------------------------------------
  config.benchmark = benchmark = ml_collections.ConfigDict()
  benchmark.warmup_steps = 2       # untimed train-step dispatches after compilation
  benchmark.train_steps = 10       # timed train-step dispatches (the median is reported)
  benchmark.sample_steps = 20      # reverse steps of the timed sampler run (0 = the full sampler)
  benchmark.sample_repeats = 2     # timed sampler runs (the median is reported)
  benchmark.peak_flops = 0.0       # > 0: peak FLOP/s per device for the MFU (else vendor table;
                                   # on CPU a matmul of cpu_matmul_size^2 is timed)
  benchmark.cpu_matmul_size = 2048

  return config
