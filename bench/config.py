"""A run is a value: one frozen dataclass holds every setting of a run.

The CLI builds it (task recipe defaults, then the user's overrides), the engine reads it, the results row
flattens it, and the run id hashes it. No setting travels any other way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from bench.errors import UserError

# Settings that say where or how fast a run happens, not what it computes: left out of the run id.
NOT_IDENTITY = ("device", "workers", "data_dir", "download", "results_dir", "loader", "channels_last", "compile",
                "lr_recipe", "target_acc", "keep_weights", "checkpoint_every", "log", "fast", "deterministic")


# Options spelled in run ids, rows, recipes, tables and the CLI as settings of their own, as they were before
# options were declared (their defaults then): the minimizers' rho and eta, the tasks' noise, noise_seed, augment
# and dropout. A RunConfig keeps them with the other options, in mopts and topts.
MINIMIZER_SPELLED = {"rho": 0.0, "eta": 0.0}
TASK_SPELLED = {"noise": 0.0, "noise_seed": 0, "augment": "basic", "dropout": 0.0}
OPTION_FIELDS = ("mopts", "topts")


@dataclass(frozen=True)
class RunConfig:
    task: str
    model: str
    minimizer: str                  # a registered minimizer ("sam", "asam", "gsam", ...) or the task's base optimizer
    optimizer: str = "sgd"          # base optimizer: sgd | adam (coupled L2) | adamw (decoupled decay, fairseq's)
    mopts: dict = field(default_factory=dict)  # every option of the minimizer, resolved (rho, eta among them)
    topts: dict = field(default_factory=dict)  # every option of the task, resolved (noise, augment, ... among them)
    accumulate: int = 1             # micro-batches per optimizer step (gradient accumulation)
    epochs: int = 200
    batch_size: int = 128           # global: each of world_size replicas takes batch_size / world_size
    lr: float = 0.1
    momentum: float = 0.9           # SGD momentum; Adam's beta1
    beta2: float = 0.999            # Adam only
    nesterov: bool = False
    weight_decay: float = 5e-4
    weight_decay_style: str = "optimizer"  # optimizer (ASAM code: coupled, not in the ascent) | loss (SAM code:
                                    # 0.5 * wd * sum ||w||^2 in the loss over all parameters, in both gradients)
    label_smoothing: float = 0.1
    schedule: str = "cosine"        # cosine (per epoch, T_max = epochs) | cosine-step (per step, SAM code) |
                                    # constant | inverse_sqrt (per step)
    warmup_steps: int = 0           # inverse_sqrt: linear warm-up steps
    clip_norm: float = 0.0          # clip the update's gradient to this global norm (0: off)
    sync_perturbation: bool = False  # data parallel: all-reduce SAM's first gradient too (m = global batch)
    m: int = 0                      # m-sharpness: each chunk of m examples of a replica's batch perturbs on its
                                    # own; 0: m = the per-replica batch
    true_gradient: bool = False     # Shake-Shake/ShakeDrop: SAM's first pass with the forward's coefficient in
                                    # the backward too (SAM code); the second pass draws independently
    world_size: int = 1             # data-parallel replicas (set from torchrun, not by hand)
    precision: str = "fp32"         # fp32 (faithful) | bf16 | fp16 (autocast; norms and e stay fp32; fp16: loss
                                    # scaling, overflowing steps skipped and counted)
    loader: str = "auto"            # auto | torchvision | device (GPU-resident data + GPU augmentation)
    channels_last: bool = False     # conv nets: NHWC memory format
    compile: bool = False           # torch.compile the model
    sam_from: float = 0.0           # plain base steps until this epoch (or fraction of training, < 1), then the
                                    # minimizer (late-phase SAM; bench.train.schedule); 0: the minimizer throughout
    sam_every: int = 1              # the minimizer's two-pass step every K-th step, plain steps between
    bn_second_pass: str = "update"  # update (official) | freeze
    second_pass_rng: str = "fresh"  # fresh (official) | reuse: dropout/ShakeDrop masks of pass 1 in pass 2
    seed: int = 0
    model_rev: str = ""             # set from the model registry: a model whose definition changed under its name
    device: str = "auto"
    workers: int = 2
    data_dir: str = "data"
    download: bool = False
    results_dir: str = "results"
    lr_recipe: float = 0.0          # the recipe's lr at its own batch size (lr is scaled linearly from it)
    target_acc: float = 0.0         # time-to-accuracy target (%); 0: the final accuracy of SGD's run of the cell
    keep_weights: bool = False      # keep the final weights (runs/<run_id>/weights.pt) for `bench sharpness`
    checkpoint_every: int = 1       # write the resume checkpoint every N epochs (and at the last, and when stopped)
    log: str = "none"               # live tracking: none | tensorboard | wandb (the CSVs stay the source of truth)
    fast: bool = False              # --fast was given: bf16 autocast, channels_last, torch.compile, TF32 matmuls
    deterministic: bool = False     # deterministic algorithms, cudnn.benchmark off, cuBLAS workspace (GPU: a resume
                                    # bit-identical to an uninterrupted run; slower)

    def __hash__(self) -> int:      # mopts is a dict: hash what identifies the run
        return hash(self.run_id)

    # Options spelled as settings of their own (rows, run ids, recipes, tables, the CLI's shorthands).
    rho = property(lambda self: self.mopts.get("rho", MINIMIZER_SPELLED["rho"]))
    eta = property(lambda self: self.mopts.get("eta", MINIMIZER_SPELLED["eta"]))
    noise = property(lambda self: self.topts.get("noise", TASK_SPELLED["noise"]))
    noise_seed = property(lambda self: self.topts.get("noise_seed", TASK_SPELLED["noise_seed"]))
    augment = property(lambda self: self.topts.get("augment", TASK_SPELLED["augment"]))
    dropout = property(lambda self: self.topts.get("dropout", TASK_SPELLED["dropout"]))

    @classmethod
    def of(cls, **settings: Any) -> "RunConfig":
        """A RunConfig from settings spelled as rows, recipes and earlier files spell them: rho, eta, noise,
        noise_seed, augment, dropout beside the fields. The base optimizer alone has no options (an older row's rho
        of an SGD run never did anything), and a spelled task option at its old default (noise 0 of a task without
        noise) is no option at all."""
        mopts, topts = (settings.pop(k, None) or {} for k in OPTION_FIELDS)
        mopts, topts = (dict(json.loads(o) if isinstance(o, str) else o) for o in (mopts, topts))  # a row's: JSON
        base = settings.get("minimizer") in OPTIMIZERS
        for key, default in MINIMIZER_SPELLED.items():
            if key in settings and not base:
                mopts.setdefault(key, settings[key])
            settings.pop(key, None)
        for key, default in TASK_SPELLED.items():
            if key in settings and settings[key] != default:
                topts.setdefault(key, settings[key])
            settings.pop(key, None)
        return cls(**settings, mopts=mopts, topts=topts)

    @property
    def scheduled(self) -> bool:
        """--sam-from or --sam-every is set: some steps are the base optimizer's alone (bench.train.schedule)."""
        return bool(self.sam_from) or self.sam_every > 1

    @property
    def per_replica_batch(self) -> int:
        return self.batch_size // self.world_size

    def spelled(self) -> dict[str, Any]:
        """The options as run ids and rows spell them: rho, eta, mopts (the minimizer's others), noise, noise_seed,
        augment, dropout, topts (the task's others)."""
        return {"rho": self.rho, "eta": self.eta,
                "mopts": {k: v for k, v in self.mopts.items() if k not in MINIMIZER_SPELLED},
                **{k: getattr(self, k) for k in TASK_SPELLED},
                "topts": {k: v for k, v in self.topts.items() if k not in TASK_SPELLED}}

    def identity(self) -> dict[str, Any]:
        """The settings that change the result. With a fixed m, every chunk of m examples perturbs alone and
        BatchNorm sees m examples at a time whatever the number of replicas, so world_size leaves it."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_IDENTITY + OPTION_FIELDS}
        out.update(self.spelled())
        if self.m:
            out.pop("world_size")
        # settings added after run ids were first published stay out of the hash at their defaults, so
        # every earlier run id (and its results) stays valid
        return {k: v for k, v in out.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}

    @property
    def run_id(self) -> str:
        """Stable across machines: same settings and seed -> same id."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        digest = hashlib.sha256(blob).hexdigest()[:10]
        return f"{self.task}-{self.model}-{self.minimizer}-s{self.seed}-{digest}"

    def to_row(self) -> dict[str, Any]:
        """The settings as row columns, options spelled as before (`spelled`): mopts and topts as one JSON cell
        each (what report matching reads) and flattened into m_<option> / t_<option> columns (what people read)."""
        spelled = self.spelled()
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in OPTION_FIELDS}
        row.update({k: v for k, v in spelled.items() if k not in OPTION_FIELDS})
        row.update({k: json.dumps(spelled[k], sort_keys=True) for k in OPTION_FIELDS})
        row.update({f"m_{k}": v for k, v in sorted(spelled["mopts"].items())})
        row.update({f"t_{k}": v for k, v in sorted(spelled["topts"].items())})
        return row


LATER_DEFAULTS = {"weight_decay_style": "optimizer", "m": 0, "true_gradient": False, "augment": "basic",
                  "model_rev": "", "mopts": {}, "accumulate": 1,
                  "dropout": 0.0, "topts": {}, "sam_from": 0.0, "sam_every": 1}
PLAIN = tuple(f.name for f in fields(RunConfig) if f.name not in OPTION_FIELDS)  # settings that are fields
# Every setting by name as people and files spell them, with its default: the fields, the spelled options,
# mopts and topts (their other options)
DEFAULTS = {**{f.name: f.default for f in fields(RunConfig) if f.name in PLAIN}, **MINIMIZER_SPELLED,
            **TASK_SPELLED, "mopts": {}, "topts": {}}
FIELD_NAMES = tuple(DEFAULTS)
TASK_SETTINGS = tuple(TASK_SPELLED)  # settings only some tasks have (a task's `Options`)
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "cosine-step", "constant", "inverse_sqrt")
AUGMENTS = ("basic", "cutout", "autoaugment", "autoaugment-cutout", "none")  # image tasks' --augment
OPTIMIZERS = ("sgd", "adam", "adamw")


def build_config(task: str, recipe: dict[str, Any], overrides: dict[str, Any], task_options: type | None = None,
                 minimizer_hparams: type | None = None) -> RunConfig:
    """Recipe defaults, then the user's non-None overrides; the minimizer's options (`minimizer_hparams`, its
    Hparams, None for the base optimizer alone: its defaults < the recipe's `minimizers.<name>` < the user's) and
    the task's (`task_options`: its defaults < the recipe's < the user's), each resolved and checked once."""
    from bench.options import NoOptions, option_names
    task_options = task_options or NoOptions
    own = option_names(task_options)
    unknown = set(recipe) - set(PLAIN) - set(own) - {"minimizers", "models", "description"}
    if unknown:
        raise UserError(f"recipe of task {task!r} has unknown keys {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    bad = set(given) - set(FIELD_NAMES)
    if bad:
        raise UserError(f"unknown setting(s) {sorted(bad)}; valid settings: {', '.join(FIELD_NAMES)}")
    values = {k: v for k, v in recipe.items() if k in PLAIN}
    values.update({k: v for k, v in given.items() if k in PLAIN}, task=task)
    if values.get("minimizer") is None:
        raise UserError("no minimizer given: pass --minimizer")
    values["mopts"] = minimizer_options(values["minimizer"], minimizer_hparams, recipe.get("minimizers", {}), given)
    values["topts"] = task_option_values(task, task_options, {k: recipe[k] for k in own if k in recipe}, given)
    values.update(_scaled_lr(recipe, given, values))
    cfg = RunConfig(**values)
    validate(cfg)
    return cfg


def _spelled_and_given(spelled: dict[str, Any], given: dict[str, Any], key: str, flag: str) -> dict[str, Any]:
    """The options given as one mapping (--mopt / --topt) joined by those given spelled (--rho, --noise, ...)."""
    opts = dict(given.get(key) or {})
    for name in spelled:
        if name in given and name in opts and opts[name] != given[name]:
            raise UserError(f"{name} given twice (--{name.replace('_', '-')} {given[name]} and {flag} "
                            f"{name}={opts[name]}); give it once")
        if name in given:
            opts[name] = given[name]
    return opts


def minimizer_options(name: str, hparams: type | None, by_minimizer: dict[str, dict], given: dict[str, Any]
                      ) -> dict[str, Any]:
    """Every option of the minimizer (rho and eta among them), resolved: its Hparams defaults, the recipe's
    `[minimizers.<name>]`, then --rho / --eta / --mopt; an option it does not have is refused. The base
    optimizer alone (hparams None) has none."""
    from bench.options import resolve
    mopts = _spelled_and_given(MINIMIZER_SPELLED, given, "mopts", "--mopt")
    if hparams is None:
        if mopts:
            raise UserError(f"{name} alone takes no minimizer options (got {', '.join(sorted(mopts))}); --rho, --eta "
                            "and --mopt are for a minimizer such as sam or gsam")
        return {}
    recipe_opts = by_minimizer.get(name, {})
    known = [f.name for f in dataclasses.fields(hparams)]
    wrong = sorted(set(recipe_opts) - set(known))
    if wrong:
        raise UserError(f"recipe option(s) {', '.join(wrong)} of minimizer {name} unknown; its options: "
                        f"{', '.join(known)}")
    return resolve(f"minimizer {name}", hparams, recipe_opts, mopts)


def task_option_values(task: str, cls: type, recipe_opts: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Every option of the task (noise, augment, ... and its own), resolved: its Options defaults, the recipe's,
    then --noise / --augment / ... / --topt; an option it does not have is refused (a spelled one at its old
    default, as sweeps and tables may pass, is no option)."""
    from bench.options import option_names, resolve
    own = option_names(cls)
    spelled = {k: v for k, v in given.items() if k in TASK_SPELLED and (k in own or v != TASK_SPELLED[k])}
    topts = _spelled_and_given(TASK_SPELLED, {**spelled, "topts": given.get("topts")}, "topts", "--topt")
    return resolve(f"task {task}", cls, recipe_opts, topts, flags=TASK_SPELLED)


def _scaled_lr(recipe: dict[str, Any], given: dict[str, Any], values: dict[str, Any]) -> dict[str, float]:
    """Recipes give lr at their (global) batch size; another batch size scales it linearly (Goyal et al.),
    unless the lr was given too. lr_recipe keeps the recipe's figure for the row."""
    lr_recipe = float(recipe.get("lr", DEFAULTS["lr"]))
    batch_recipe = int(recipe.get("batch_size", DEFAULTS["batch_size"]))
    if "lr" in given or values.get("batch_size", batch_recipe) == batch_recipe:
        return {"lr_recipe": lr_recipe}
    return {"lr_recipe": lr_recipe, "lr": lr_recipe * values["batch_size"] / batch_recipe}


def validate(cfg: RunConfig) -> None:
    """Refuse numbers that make no sense, with the reason and what to pass instead."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    need(cfg.seed >= 0, f"--seed and --noise-seed must be >= 0, got {cfg.seed}")
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(finite(cfg.lr) and cfg.lr > 0, f"--lr must be a finite number > 0, got {cfg.lr}")
    need(finite(cfg.momentum) and 0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(finite(cfg.beta2) and 0 <= cfg.beta2 < 1, f"--beta2 must be in [0, 1), got {cfg.beta2}")
    need(finite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(finite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1,
         f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    need(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                                      f"got {cfg.optimizer!r}")
    need(cfg.bn_second_pass in ("update", "freeze"),
         f"--bn-second-pass must be 'update' or 'freeze', got {cfg.bn_second_pass!r}")
    need(cfg.second_pass_rng in ("fresh", "reuse"),
         f"--second-pass-rng must be 'fresh' or 'reuse', got {cfg.second_pass_rng!r}")
    need(cfg.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    need(isinstance(cfg.accumulate, int) and cfg.accumulate >= 1 and cfg.per_replica_batch % cfg.accumulate == 0,
         f"--accumulate {cfg.accumulate} must be >= 1 and divide the per-replica batch {cfg.per_replica_batch}; "
         f"pass a divisor of it")
    need(not (cfg.m and cfg.accumulate > 1 and cfg.m > cfg.per_replica_batch // cfg.accumulate),
         f"--m {cfg.m} is larger than a micro-batch ({cfg.per_replica_batch // cfg.accumulate} examples with "
         f"--accumulate {cfg.accumulate}); pass --m {cfg.per_replica_batch // cfg.accumulate} for one perturbation "
         "per micro-batch, or --m 0 for one from the whole batch")
    need(finite(cfg.target_acc) and 0 <= cfg.target_acc <= 100,
         f"--target-acc must be a percentage in [0, 100] (0: SGD's final accuracy), got {cfg.target_acc}")
    need(cfg.loader in ("auto", "torchvision", "device"),
         f"--loader must be auto, torchvision or device, got {cfg.loader!r}")
    need(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    need(finite(cfg.clip_norm) and cfg.clip_norm >= 0, f"--clip-norm must be >= 0, got {cfg.clip_norm}")
    need(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    need(isinstance(cfg.checkpoint_every, int) and cfg.checkpoint_every >= 1,
         f"--checkpoint-every must be an integer >= 1 (epochs between checkpoints), got {cfg.checkpoint_every}")
    need(cfg.log in ("none", "tensorboard", "wandb"), f"--log must be none, tensorboard or wandb, got {cfg.log!r}")
    need(cfg.weight_decay_style in ("optimizer", "loss"),
         f"--weight-decay-style must be optimizer or loss, got {cfg.weight_decay_style!r}")
    need(cfg.world_size >= 1 and cfg.batch_size % cfg.world_size == 0,
         f"--batch-size {cfg.batch_size} is the global batch and must divide by the {cfg.world_size} replicas; "
         f"pass a multiple of {cfg.world_size}")
    need(cfg.m >= 0 and (cfg.m == 0 or cfg.per_replica_batch % cfg.m == 0),
         f"--m {cfg.m} must divide the per-replica batch {cfg.per_replica_batch}; pass a divisor of it (or 0: "
         "m = the per-replica batch)")
    problem = schedule_problem(cfg.sam_from, cfg.sam_every, cfg.epochs)
    need(problem is None, problem or "")
    need(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
         f"--device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    need(not (cfg.world_size > 1 and cfg.device.startswith("cuda:")),
         f"--device {cfg.device} with {cfg.world_size} processes (torchrun) would put every rank on that one GPU; "
         "pass --device cuda (each rank takes its own, LOCAL_RANK's) and choose GPUs with CUDA_VISIBLE_DEVICES")


def sam_start_epoch(sam_from: float, epochs: int) -> int:
    """The first (0-based) epoch of the two-pass phase; 0 when --sam-from is off."""
    if not sam_from:
        return 0
    return math.floor(sam_from * epochs + 1e-9) if sam_from < 1 else int(sam_from)  # 1e-9: 0.875 * 200 is 175


def schedule_problem(sam_from: float, sam_every: int, epochs: int) -> str | None:
    """Why these schedule settings make no sense (one line with what to pass), or None."""
    if not (isinstance(sam_from, (int, float)) and math.isfinite(sam_from) and 0 <= sam_from < epochs):
        return (f"--sam-from must be in (0, {epochs}) (an epoch, or a fraction of training below 1; 0: off), "
                f"got {sam_from}")
    if sam_from >= 1 and sam_from != int(sam_from):
        return f"--sam-from {sam_from} is above 1, so an epoch: pass an integer (or a fraction below 1)"
    if sam_from and sam_start_epoch(sam_from, epochs) == 0:
        return (f"--sam-from {sam_from} of {epochs} epochs starts at epoch 0, i.e. the minimizer all along: pass a "
                f"larger fraction, or leave --sam-from out")
    if not (isinstance(sam_every, int) and sam_every >= 1):
        return f"--sam-every must be an integer >= 1 (1: every step), got {sam_every}"
    return None


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML file whose keys are RunConfig fields; anything else is refused."""
    try:
        values = load_toml(path)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except Exception as e:  # tomllib.TOMLDecodeError and friends
        raise UserError(f"config file {path} is not valid TOML ({' '.join(str(e).split())})") from None
    unknown = sorted(set(values) - set(FIELD_NAMES) - {"task"})
    if unknown:
        raise UserError(f"config file {path}: unknown key(s) {', '.join(unknown)}; valid keys: "
                        f"{', '.join(f for f in FIELD_NAMES if f not in ('task', 'world_size'))}")
    values.pop("task", None)
    return values


def load_toml(path) -> dict[str, Any]:
    """Read a TOML file (recipes, tables, config files: hyperparameters are data next to the code)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)
