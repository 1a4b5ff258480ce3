"""Many devices: the mesh, FSDP shardings, and placing arrays on devices around a jitted call."""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import InputError, adamw_init, init_params
from llamatool.settings import param_shapes
from llamatool.muon import OPTIMIZERS


# One code path for 1 to N devices, with JAX's own machinery (see the guide
# "Distributed arrays and automatic parallelization" on docs.jax.dev). The
# devices form a 2-D mesh with axes ("data", "fsdp"):
#   - the batch is split over every device (both axes): each one computes the
#     loss and gradients of its rows, and XLA inserts the communication that
#     makes the update the one of the whole batch;
#   - the weights and optimizer moments are split over "fsdp" (ZeRO-3 / fully
#     sharded data parallel: Rajbhandari et al. 2020, arXiv:1910.02054) and
#     copied over "data". --fsdp 1 (the default) is pure data parallelism:
#     every device holds everything and the gradients are all-reduced.
#     --fsdp all shards over every device: each holds 1/N of every matrix,
#     gathered just in time for its matmul, and the gradients are
#     reduce-scattered so that each device updates only its own part.
# The layers, model and loss (sections 3 to 5) know nothing of it: they are
# written for one device, jax.jit compiles them for the mesh from the
# shardings of their inputs (GSPMD), and the results are those of one device
# to float32 rounding (tests/test_devices.py checks 1, 8, FSDP and 2 x 4). The
# mesh's axes are "auto": jax 0.10's default, "explicit", would make every
# einsum in the model say how its output is split.
# Several hosts (processes) join one mesh through jax.distributed; every
# process runs the same program on its own devices, reads the same batches,
# and only process 0 prints and writes files.


def make_mesh(fsdp=1, devices=None):
    """The ("data", "fsdp") mesh over `devices` (default: every device of
    every process). fsdp: devices per FSDP group, a divisor of their number,
    or "all"."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp == "all":
        fsdp = n
    elif not str(fsdp).isdigit():
        raise InputError(f"--fsdp {fsdp}: give a number of devices per FSDP group, or all")
    fsdp = int(fsdp)
    if fsdp < 1 or n % fsdp:
        choices = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        raise InputError(f"--fsdp {fsdp} does not divide the {n} device{'s' * (n > 1)}: "
                         f"choose one of {choices} or all")
    return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def fsdp_spec(shape, n):
    """How one array is split over a mesh whose "fsdp" axis has n devices: a
    matrix along its largest dimension that n divides (the embedding and
    output layer along the vocabulary, the others along their wider side);
    vectors (norm gains, the step count), and matrices n divides nowhere, are
    copied to every device. -> a PartitionSpec."""
    if n > 1 and len(shape) >= 2:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % n == 0:
                return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return P()


def state_shardings(mesh, tree):
    """The NamedSharding of every leaf of a pytree of arrays (or shapes):
    parameters, optimizer state, LoRA adapters, keys. Replicated over
    "data", split over "fsdp" by fsdp_spec."""
    n = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n)), tree)


def batch_sharding(mesh):
    """Rows of a batch [B, ...] split over every device of the mesh."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def split_batch(batch, mesh):
    """Inside a jitted step: a batch's rows split over every device of the
    mesh (None: left as it is)."""
    if mesh is None:
        return batch
    return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def keep_split(mesh, tree):
    """Inside a jitted step: new weights and optimizer state split as the
    old ones were (state_shardings), so that a step's outputs are the next
    step's inputs as they are, and donation can reuse their buffers."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, state_shardings(mesh, tree))


def place(tree, shardings):
    """Host or device arrays -> global arrays with these shardings. Each
    device receives only its own slice (make_array_from_callback), which also
    works when the mesh spans several processes that each hold the same
    values."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree_util.tree_map(put, tree, shardings)


def place_state(mesh, tree):
    """Weights or optimizer state (host or device arrays) split over the mesh
    by state_shardings."""
    return place(tree, state_shardings(mesh, tree))


def copies(mesh, tree):
    """A copy-on-every-device NamedSharding for each leaf of a pytree."""
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)


def replicated(mesh, tree):
    """A pytree copied to every device of the mesh."""
    return place(tree, copies(mesh, tree))


def gather(x):
    """One global array -> a NumPy array on every process (a collective when
    the array spans processes: every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sharded_init(key, config, mesh):
    """init_params compiled to write each device's shard where it lives: the
    full weights are never on one device."""
    shardings = state_shardings(mesh, param_shapes(config))
    return jax.jit(init_params, static_argnums=1, out_shardings=shardings)(key, config)


def sharded_optimizer_init(params, mesh, tc=None):
    """The optimizer's state (tc.optimizer's, default AdamW's), its moments
    split like the weights."""
    init = adamw_init if tc is None else OPTIMIZERS[tc.optimizer].init
    shapes = jax.eval_shape(init, params)
    return jax.jit(init, out_shardings=state_shardings(mesh, shapes))(params)


def describe_mesh(mesh):
    kind = mesh.devices.flat[0].platform.upper()
    hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (f"{mesh.size} {kind} device{'s' if mesh.size > 1 else ''}{hosts} as data "
            f"{mesh.shape['data']} x fsdp {mesh.shape['fsdp']}")


def check_batch_split(tc, mesh):
    """The global batch must split evenly over the devices and micro-batches."""
    parts = mesh.size * tc.grad_accum
    if tc.batch_size % parts:
        fit = parts * max(1, round(tc.batch_size / parts))
        accum = f" x --grad-accum {tc.grad_accum}" if tc.grad_accum > 1 else ""
        raise InputError(f"--batch-size {tc.batch_size} does not split over {mesh.size} "
                         f"device(s){accum}: use a multiple of {parts}, e.g. --batch-size {fit}")


def describe_batch(tc, mesh):
    """Tokens per optimizer step, in total and per device, and where."""
    tokens = tc.batch_size * tc.seq_len
    micro = (f", in {tc.grad_accum} micro-batches of {tokens // tc.grad_accum:,}"
             if tc.grad_accum > 1 else "")
    return (f"batch: {tc.batch_size} x {tc.seq_len} = {tokens:,} tokens per optimizer step on "
            f"{describe_mesh(mesh)}: {tokens // mesh.size:,} per device{micro}")
