"""unet-np train's settings: what a flag not given means, and what a resumed run keeps from its
checkpoint (the architecture, the optimizer, the seed and split, instance targets)."""
from .common import CLIError, instance_meta, load_model

# What `unet-np train` uses where a flag is not given. With --resume the architecture is the
# checkpoint's, and a training setting not given is the one the checkpoint's run used.
ARCH_DEFAULTS = dict(arch="unet", depth=3, base_channels=16, padding="same", batchnorm=False,
                     upsample="transpose", no_skip=False, init="torch", dtype="float32")
TRAIN_DEFAULTS = dict(optimizer="adam", momentum=0.9, batch_size=4, augment="basic", weight_map=False,
                      val_split=0.2, seed=0)
RESUME_FIXED = ("optimizer", "seed", "val_split")    # the optimizer state, the train/validation split
RESUME_CHANGEABLE = ("lr", "momentum", "batch_size", "augment", "weight_map")
_FLAG_ASKS = {"batchnorm": "the checkpoint has no batch-norm",
              "no_skip": "the checkpoint has skip connections"}


def resume_settings(args, model, data):
    """Fill args from the checkpoint being resumed (``data``: its data meta). The architecture,
    --classes, the optimizer, the seed and the validation split are the checkpoint's: a flag that
    asks for another is an error. The other training settings not given are those of the checkpoint's
    run ("train" in its data meta); one given that differs is used. Returns (the changed settings
    as 'flag value (was value)' strings, whether the checkpoint records its training settings)."""
    saved = data.get("train")
    cfg = model.config()
    have = dict(cfg, arch=model.arch, no_skip=not cfg.get("skip", True), classes=model.num_classes)
    have.setdefault("padding", "same")
    if saved:
        have.update({key: saved[key] for key in RESUME_FIXED if key in saved})
    conflicts = []
    for key in (*ARCH_DEFAULTS, "classes", *RESUME_FIXED):
        given, flag = getattr(args, key), "--" + key.replace("_", "-")
        if key not in have:                      # an older checkpoint: the command line or default
            setattr(args, key, TRAIN_DEFAULTS[key] if given is None else given)
            continue
        if given is not None and given != have[key]:
            conflicts.append(f"{flag} ({_FLAG_ASKS[key]})" if given is True and key in _FLAG_ASKS
                             else f"{flag} {given} (the checkpoint has {have[key]})")
        setattr(args, key, have[key])
    if conflicts:
        raise CLIError(f"{args.resume}: a resumed run keeps the checkpoint's architecture, optimizer, "
                       f"seed and validation split; drop {', '.join(conflicts)}")
    before_run = saved if saved else {"weight_map": data.get("weight_map")}
    changed = []
    for key in RESUME_CHANGEABLE:
        given, before = getattr(args, key), before_run.get(key)
        if given is None:
            setattr(args, key, before if before is not None else TRAIN_DEFAULTS.get(key))
        elif before is not None and given != before:
            changed.append(f"--{key.replace('_', '-')} {given} (was {before})")
    return changed, bool(saved)


def instance_settings(args):
    """Settle --instances, --border and the weight map's default from the flags and, with --resume,
    the checkpoint (a run trained with --instances goes on with them). Returns a note for the user,
    or None."""
    note = None
    saved = instance_meta(load_model(args.resume)[1]) if args.resume else None
    if args.resume and args.instances and saved is None:
        raise CLIError(f"{args.resume}: its model was not trained with --instances (it predicts "
                       f"classes); start a new run to learn instances")
    if saved is not None:
        was = saved.get("border")
        if args.border is not None and was is not None and args.border != was:
            raise CLIError(f"{args.resume}: a resumed run keeps the checkpoint's targets; drop "
                           f"--border {args.border} (the checkpoint has {was})")
        if not args.instances:
            note = f"--instances: {args.resume} was trained with it"
        args.instances = True
        args.border = args.border if args.border is not None else (was or 2)
    if args.border is not None and not args.instances:
        raise CLIError("--border sets the border band of --instances; give both, or neither")
    if args.instances:
        args.border = 2 if args.border is None else args.border
        if args.classes is not None and args.classes != 3:
            raise CLIError(f"--instances learns 3 classes (background, interior, border); drop "
                           f"--classes {args.classes}")
        if args.weight_map is None and not args.resume:
            args.weight_map = True       # the paper's weight map, from the true instances
    return note
