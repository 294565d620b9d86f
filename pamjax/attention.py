"""PAMattention numerics: exact softmax attention over KV spread across memory tiers.

PAM keeps a request's KV cache on several PIM-enabled devices (HBM-PIM, DDR-PIM, SSD-PIM) and
computes attention where the KV lives. For one query vector ``q`` and a token set split into
blocks ``j`` (by device, and inside a device by bank group or channel), every block computes,
with ``s = q·Kⱼᵀ / √d``::

    m_j = max(s)        p = exp(s − m_j)        l_j = Σ p        o_j = p · V_j

(``o_j`` un-normalised). Any set of such *partials* merges exactly with::

    m = max_j m_j       l = Σ_j exp(m_j − m)·l_j       o = Σ_j exp(m_j − m)·o_j

and the attention output is ``o / l``. The merge is associative and commutative, so one
function serves both the intra-device reduction (the reduction units beside the bank groups)
and the inter-device reduction (on the HBM side), and the result equals exact softmax attention
over the attended tokens wherever they sit.

The published pseudo-code has five defects; this module follows PAM_SPEC §4's corrections:

(a) the logits carry the ``1/√d`` scale (:func:`local_attention`);
(b) the published reduction returns a log-sum-exp in place of ``l`` and then divides by it;
    here every partial carries ``(o, m, l)`` in the consistent form above, never a mix with
    ``lse = m + log l`` (:class:`Partial`, :func:`merge_partials`, :func:`finalize`);
(c) a block without attended tokens is the identity element ``m = −∞, l = 0, o = 0``, and no
    step ever evaluates ``exp(−∞ − (−∞))``, so empty blocks, tiers and rows give no NaN (an
    all-empty row finalizes to zeros);
(d) grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``, the grouping
    of :func:`jax.nn.dot_product_attention`;
(e) logits, exponentials, sums and the ``p·V`` products are float32 even for bfloat16/float16
    inputs; only the final output is cast back to the query's dtype.

:func:`pam_attention` runs the three hardware stages with fixed shapes and masks: local partials
per (tier, bank group) via nested :func:`jax.vmap`, reduction over bank groups, then over tiers,
optionally with the tiers sharded over a device mesh by :func:`jax.shard_map`.
:func:`flash_decoding_attention` is the "without PAMattention" ablation: a fixed split of the
token axis into contiguous chunks that ignores tier boundaries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pamjax.errors import ConfigError

# float32 everywhere inside (correction (e)); HIGHEST stops XLA on GPU/TPU from lowering the
# float32 dot products to TF32/bfloat16 passes, which would cost the exactness this module
# promises.
_ACC = jnp.float32
_PRECISION = lax.Precision.HIGHEST


@struct.dataclass
class Partial:
    """Partial softmax-attention result of one block of tokens (or of a merge of blocks).

    Fields share arbitrary leading axes ``[...]`` (batch, tier, bank group, ...).

    Attributes:
      o: un-normalised output ``Σ exp(s − m)·v``, float32 ``[..., Hq, D]``.
      m: running maximum of the scaled logits over the block's attended tokens, float32
        ``[..., Hq]``; ``−inf`` for a block with no attended token.
      l: sum of ``exp(s − m)`` over the block's attended tokens, float32 ``[..., Hq]``;
        ``0`` for a block with no attended token.
    """

    o: jax.Array
    m: jax.Array
    l: jax.Array


def empty_partial(hq: int, d: int, batch_shape: tuple[int, ...] = ()) -> Partial:
    """The identity element of :func:`merge_partials` (a block that attends no token).

    Args:
      hq: number of query heads ``Hq``.
      d: head dimension ``D``.
      batch_shape: leading axes of the fields.

    Returns:
      A :class:`Partial` with ``o = 0`` ``[*batch_shape, hq, d]``, ``m = −inf`` and ``l = 0``
      ``[*batch_shape, hq]``, all float32.
    """
    shape = (*batch_shape, hq)
    return Partial(
        o=jnp.zeros((*shape, d), _ACC),
        m=jnp.full(shape, -jnp.inf, _ACC),
        l=jnp.zeros(shape, _ACC),
    )


def _shift(m: jax.Array) -> jax.Array:
    """Max logit to subtract, with ``−inf`` (nothing attended) replaced by 0.

    Subtracting 0 instead of ``−inf`` turns ``exp(−inf − (−inf)) = NaN`` into
    ``exp(−inf) = 0``, which is what makes empty blocks the identity (correction (c)).
    """
    return jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> Partial:
    """Partial attention of one query over one block of tokens (one bank group's work).

    Args:
      q: query, ``[Hq, D]``, any float dtype.
      k: keys, ``[N, Hkv, D]``, any float dtype; ``Hq`` must be a multiple of ``Hkv``.
      v: values, ``[N, Hkv, D]``, any float dtype.
      valid: bool ``[N]``, the tokens of this block the query attends.

    Returns:
      The block's :class:`Partial` with fields ``o`` ``[Hq, D]``, ``m`` and ``l`` ``[Hq]``, all
      float32. A block with no valid token gives the identity element of
      :func:`merge_partials`. Composes with :func:`jax.vmap` for batched use.

    Raises:
      ConfigError: if the shapes do not match or ``Hq`` is not a multiple of ``Hkv``.
    """
    q, k, v, valid = (jnp.asarray(x) for x in (q, k, v, valid))
    _check_heads(q.shape, k.shape, v.shape, q_rank=2)
    if valid.shape != k.shape[:1]:
        raise ConfigError("valid.shape", valid.shape, f"expected [N] = {k.shape[:1]}")
    hq, d = q.shape
    hkv = k.shape[1]
    # GQA (correction (d)): a [Hkv, G, D] view puts query head h at (h // G, h % G), so each
    # KV head is read once for its whole group instead of being repeated G times.
    qg = q.astype(_ACC).reshape(hkv, hq // hkv, d)
    s = jnp.einsum("kgd,nkd->kgn", qg, k.astype(_ACC), precision=_PRECISION)
    s = s / jnp.sqrt(jnp.asarray(d, _ACC))  # correction (a)
    s = jnp.where(valid, s, -jnp.inf)
    # `initial` keeps N = 0 legal and yields m = -inf for a block with nothing attended.
    m = jnp.max(s, axis=-1, initial=-jnp.inf)
    p = jnp.exp(s - _shift(m)[..., None])
    o = jnp.einsum("kgn,nkd->kgd", p, v.astype(_ACC), precision=_PRECISION)
    return Partial(o=o.reshape(hq, d), m=m.reshape(hq), l=p.sum(-1).reshape(hq))


def merge_partials(partial: Partial, axis: int) -> Partial:
    """Exact merge of partials stacked along one leading axis (a reduction unit's work).

    ``m = max_j m_j``, ``l = Σ_j exp(m_j − m)·l_j``, ``o = Σ_j exp(m_j − m)·o_j``. Associative
    and commutative; identity elements (``m = −inf``) contribute nothing, and an all-empty
    merge returns the identity element without NaN. Every weight ``exp(m_j − m)`` is at most 1,
    so large logits cannot overflow.

    Args:
      partial: a :class:`Partial` whose fields carry the axis to merge.
      axis: the axis to reduce, counted on the axes of ``m``/``l`` (the same index addresses
        that axis of ``o``, whose extra trailing axis is ``D``); negative values count from
        the end of ``m``'s axes.

    Returns:
      The merged :class:`Partial`, float32, with ``axis`` removed from every field.

    Raises:
      ConfigError: if ``axis`` is out of range for ``m``.
    """
    ndim = partial.m.ndim
    if not -ndim <= axis < ndim:
        raise ConfigError("axis", axis, f"out of range for m of rank {ndim}")
    axis %= ndim
    m_j = partial.m.astype(_ACC)
    m = jnp.max(m_j, axis=axis, initial=-jnp.inf)
    w = jnp.exp(m_j - jnp.expand_dims(_shift(m), axis))
    return Partial(
        o=jnp.sum(w[..., None] * partial.o.astype(_ACC), axis=axis),
        m=m,
        l=jnp.sum(w * partial.l.astype(_ACC), axis=axis),
    )


def finalize(partial: Partial) -> jax.Array:
    """Normalised attention output ``o / l`` of a (merged) partial.

    Args:
      partial: a :class:`Partial` with fields ``[..., Hq, D]`` and ``[..., Hq]``.

    Returns:
      float32 ``[..., Hq, D]``; rows that attended no token (``l = 0``) give 0, not NaN.
    """
    total = partial.l[..., None]
    nonempty = total > 0
    return jnp.where(nonempty, partial.o / jnp.where(nonempty, total, 1.0), 0.0)


def pam_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tier: jax.Array,
    *,
    num_tiers: int,
    valid: jax.Array | None = None,
    blocks_per_tier: int = 4,
    mesh: Mesh | None = None,
    tier_axis: str | None = None,
) -> jax.Array:
    """Decode attention computed where the KV lives, reduced in two levels (PAMattention).

    Stage 1: each tier (device) splits its tokens over ``blocks_per_tier`` bank groups and
    computes one local partial per (tier, bank group). The ``r``-th token of a tier, counting
    that tier's tokens in token order whether attended or not, lives in bank group
    ``r mod blocks_per_tier``: round-robin interleaving keeps every bank group of a device
    equally loaded whatever the tier mix, as the bank-group-interleaved layout does in
    hardware. Stage 2 merges each tier's bank groups (intra-device reduction); stage 3 merges
    the tiers (inter-device reduction); the result is then normalised.

    Shapes stay fixed: a token feeds the partial of (t, b) iff ``tier == t``, its bank group is
    ``b`` and it is ``valid``, so every block masks the full token axis (work grows by
    ``num_tiers · blocks_per_tier``; fine for a simulator, never dynamic shapes). Tokens whose
    tier lies outside ``[0, num_tiers)`` are attended by no tier.

    With ``mesh``, the tier axis is sharded over the mesh axis ``tier_axis`` with
    :func:`jax.shard_map`, ``num_tiers / size`` tiers per device; each device merges its own
    tiers and the inter-device merge is the collective form of :func:`merge_partials`
    (``m = pmax(m_local)``, ``l = psum(exp(m_local − m)·l_local)``, ``o`` likewise). Queries and
    KV are replicated (which device holds which token is traced data, not a static split), and
    so is the computation over every other mesh axis: on a ``("data", "tier")`` mesh each
    ``"data"`` row computes the whole batch and the result is replicated over the whole mesh.
    Any :class:`jax.sharding.Mesh` works, ``Auto`` or ``Explicit`` axis types (the default of
    :func:`jax.make_mesh`), inside or outside ``with jax.set_mesh(mesh)``: inputs, whatever
    their sharding, are first resharded to the layout above. The result equals the unsharded
    one up to float32 summation order. Without ``mesh`` the tiers are not sharded; under a
    context mesh with ``Explicit`` axes the inputs are then replicated over it first.

    Jit with ``num_tiers``, ``blocks_per_tier``, ``mesh`` and ``tier_axis`` static.

    Args:
      q: queries, ``[B, Hq, D]``, float dtype (one decode token per request).
      k: keys, ``[B, N, Hkv, D]``, float dtype; ``Hq`` must be a multiple of ``Hkv``.
      v: values, ``[B, N, Hkv, D]``, float dtype.
      tier: integer ``[B, N]``, the tier (device) holding each token, in ``[0, num_tiers)``.
      num_tiers: number of tiers ``T`` (static, at least 1).
      valid: bool ``[B, N]``, the tokens the selector attends; all tokens when ``None``.
      blocks_per_tier: bank groups per tier (static, at least 1).
      mesh: optional :class:`jax.sharding.Mesh` whose axis ``tier_axis`` shards the tiers; it
        must be the context mesh when one is set with :func:`jax.set_mesh`.
      tier_axis: name of the mesh axis that shards the tiers (static); ``None`` picks the
        mesh's first axis. Its size must divide ``num_tiers``. Only with ``mesh``.

    Returns:
      Attention output ``[B, Hq, D]`` in ``q``'s dtype (accumulated in float32); zeros for a
      request with no attended token.

    Raises:
      ConfigError: on a non-positive ``num_tiers`` or ``blocks_per_tier``, mismatched shapes,
        ``Hq`` not a multiple of ``Hkv``, a non-integer ``tier``, a non-bool ``valid``, a
        ``mesh`` that is not a :class:`jax.sharding.Mesh` or differs from the context mesh, a
        ``tier_axis`` without a mesh or not among its axes, or a tier axis whose size does
        not divide ``num_tiers``.
    """
    q, k, v, tier = (jnp.asarray(x) for x in (q, k, v, tier))
    valid = _check_batched(q, k, v, valid)
    _check_count("num_tiers", num_tiers)
    _check_count("blocks_per_tier", blocks_per_tier)
    if tier.shape != valid.shape:
        raise ConfigError("tier.shape", tier.shape, f"expected [B, N] = {valid.shape}")
    if not jnp.issubdtype(tier.dtype, jnp.integer):
        raise ConfigError("tier.dtype", tier.dtype, "expected an integer dtype")
    if mesh is not None:
        axis_name = _tier_axis(mesh, tier_axis, num_tiers)
    elif tier_axis is not None:
        raise ConfigError("tier_axis", tier_axis, "names a mesh axis, but no mesh was given")
    q, k, v, tier, valid = _replicated(mesh, q, k, v, tier, valid)
    block = _bank_group(tier, num_tiers, blocks_per_tier)
    # [T, B, N]: tier-major so that the tier axis is the one a mesh shards.
    attended = (tier == jnp.arange(num_tiers)[:, None, None]) & valid
    tier_partials = functools.partial(_tier_partials, blocks_per_tier=blocks_per_tier)
    if mesh is None:
        merged = merge_partials(tier_partials(q, k, v, attended, block), axis=0)
    else:
        merged = _sharded_merge(mesh, axis_name, tier_partials, q, k, v, attended, block)
    return finalize(merged).astype(q.dtype)


def _sharded_merge(mesh: Mesh, axis_name: str, tier_partials, q, k, v, attended, block):
    """pam_attention's stages 2-3 with the tiers sharded over ``axis_name``: each device
    merges its own tiers, then the devices merge collectively (_merge_across)."""

    def per_device(q, k, v, attended, block):
        local = merge_partials(tier_partials(q, k, v, attended, block), axis=0)
        return _merge_across(local, axis_name)

    # Manual over every mesh axis; only the tier axis splits data, so on the other axes
    # every device computes the same (replicated) result.
    replicated, by_tier = PartitionSpec(), PartitionSpec(axis_name)
    if dict(zip(mesh.axis_names, mesh.axis_types))[axis_name] == AxisType.Explicit:
        # shard_map checks that an input typed by explicit axes already has its in_spec
        # (on Auto axes it lays the inputs out itself, and reshard refuses Auto axes).
        attended = jax.reshard(attended, NamedSharding(mesh, by_tier))
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(replicated, replicated, replicated, by_tier, replicated),
        out_specs=replicated,
    )(q, k, v, attended, block)


def flash_decoding_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array | None = None,
    *,
    num_splits: int = 8,
) -> jax.Array:
    """FlashDecoding-style split attention: the "without PAMattention" ablation.

    The token axis is cut into ``num_splits`` contiguous chunks of ``ceil(N / num_splits)``
    tokens (the last ones padded with unattended tokens), blind to which tier holds a token,
    so chunks straddle devices and all partials go to one central merge.

    Args:
      q: queries, ``[B, Hq, D]``, float dtype.
      k: keys, ``[B, N, Hkv, D]``, float dtype; ``Hq`` must be a multiple of ``Hkv``.
      v: values, ``[B, N, Hkv, D]``, float dtype.
      valid: bool ``[B, N]``, the attended tokens; all tokens when ``None``.
      num_splits: number of chunks (static, at least 1).

    Returns:
      Attention output ``[B, Hq, D]`` in ``q``'s dtype (accumulated in float32); zeros for a
      request with no attended token.

    Raises:
      ConfigError: on a non-positive ``num_splits``, mismatched shapes, ``Hq`` not a multiple
        of ``Hkv`` or a non-bool ``valid``.
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    valid = _check_batched(q, k, v, valid)
    _check_count("num_splits", num_splits)
    b, n, hkv, d = k.shape
    chunk = -(-n // num_splits)
    pad = chunk * num_splits - n
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
    split = (b, num_splits, chunk)
    per_chunk = jax.vmap(local_attention, in_axes=(None, 0, 0, 0))
    partial = jax.vmap(per_chunk)(
        q, k.reshape(*split, hkv, d), v.reshape(*split, hkv, d), valid.reshape(split)
    )
    return finalize(merge_partials(partial, axis=1)).astype(q.dtype)


def _bank_group(tier: jax.Array, num_tiers: int, blocks_per_tier: int) -> jax.Array:
    """Bank group of every token: its rank among its tier's tokens, mod ``blocks_per_tier``.

    Args:
      tier: integer ``[B, N]``.
      num_tiers: number of tiers.
      blocks_per_tier: bank groups per tier.

    Returns:
      int32 ``[B, N]`` in ``[0, blocks_per_tier)`` (0 for tokens outside every tier).
    """
    on_tier = tier[..., None] == jnp.arange(num_tiers)  # [B, N, T]
    rank = jnp.cumsum(on_tier, axis=1, dtype=jnp.int32) - 1
    return jnp.sum(jnp.where(on_tier, rank, 0), axis=-1) % blocks_per_tier


def _tier_partials(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attended: jax.Array,
    block: jax.Array,
    *,
    blocks_per_tier: int,
) -> Partial:
    """Stages 1 and 2: local partials per (tier, bank group), merged over bank groups.

    Args:
      q: ``[B, Hq, D]``.
      k: ``[B, N, Hkv, D]``.
      v: ``[B, N, Hkv, D]``.
      attended: bool ``[T, B, N]``, token attended and on tier ``t``.
      block: int32 ``[B, N]``, each token's bank group.
      blocks_per_tier: bank groups per tier.

    Returns:
      One :class:`Partial` per (tier, request): fields ``[T, B, Hq, D]`` and ``[T, B, Hq]``.
    """
    in_block = block == jnp.arange(blocks_per_tier)[:, None, None]  # [G, B, N]
    mask = attended[:, None] & in_block  # [T, G, B, N]
    # q, k and v are unbatched over tiers and bank groups, so vmap computes the logits once
    # per request and only the masking and the p·V products are repeated per block.
    per_request = jax.vmap(local_attention)
    per_block = jax.vmap(per_request, in_axes=(None, None, None, 0))
    per_tier = jax.vmap(per_block, in_axes=(None, None, None, 0))
    return merge_partials(per_tier(q, k, v, mask), axis=1)


def _merge_across(partial: Partial, axis_name: str) -> Partial:
    """:func:`merge_partials` across the devices of a mesh axis, as collectives.

    Args:
      partial: this device's merged partial.
      axis_name: the mesh axis whose devices hold the other partials.

    Returns:
      The merge of every device's partial, identical on all of them.
    """
    m = lax.pmax(partial.m, axis_name)
    w = jnp.exp(partial.m - _shift(m))
    return Partial(
        o=lax.psum(w[..., None] * partial.o, axis_name),
        m=m,
        l=lax.psum(w * partial.l, axis_name),
    )


def _tier_axis(mesh: Mesh, tier_axis: str | None, num_tiers: int) -> str:
    """Validate ``mesh`` for :func:`pam_attention` and return the name of its tier axis.

    Raises:
      ConfigError: if ``mesh`` is not a :class:`jax.sharding.Mesh`, has a ``Manual`` axis,
        differs from the context mesh of :func:`jax.set_mesh`, lacks ``tier_axis``, or that
        axis's size does not divide ``num_tiers``.
    """
    if not isinstance(mesh, Mesh):
        raise ConfigError("mesh", mesh, "expected a jax.sharding.Mesh")
    if AxisType.Manual in mesh.axis_types:
        raise ConfigError("mesh", mesh, "Manual axes are not supported; use Auto or Explicit")
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and context != mesh.abstract_mesh:
        raise ConfigError("mesh", mesh, f"differs from the context mesh {context}")
    axis_name = mesh.axis_names[0] if tier_axis is None else tier_axis
    if axis_name not in mesh.axis_names:
        raise ConfigError("tier_axis", tier_axis, f"not an axis of the mesh {mesh.axis_names}")
    size = mesh.shape[axis_name]
    if num_tiers % size:
        raise ConfigError(
            "num_tiers", num_tiers, f"not divisible by the size {size} of mesh axis {axis_name!r}"
        )
    return axis_name


def _replicated(mesh: Mesh | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` replicated over the ``Explicit`` axes of ``mesh`` (or of the context mesh).

    Explicit axes type every array by its sharding, and some ops refuse an axis sharded that
    way (the ``cumsum`` over tokens in :func:`_bank_group`), as does :func:`jax.shard_map`
    when an input's sharding differs from its in_spec. Replicating first makes any input
    layout work. ``Auto`` axes need nothing (the compiler picks the layout), so the arrays
    come back unchanged when the mesh has no ``Explicit`` axis, or when ``mesh`` is ``None``
    and no context mesh is set (the unsharded path, as before meshes existed).
    """
    target = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if AxisType.Explicit not in target.axis_types:
        return arrays
    # A bare PartitionSpec refers to the context mesh, which a mesh=None call relies on.
    sharding = PartitionSpec() if mesh is None else NamedSharding(mesh, PartitionSpec())
    return tuple(jax.reshard(x, sharding) for x in arrays)


def _check_count(field: str, value) -> None:
    """Raise ConfigError unless ``value`` is a Python (or NumPy) integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(field, value, "expected an integer of at least 1")


def _check_heads(q_shape, k_shape, v_shape, *, q_rank: int) -> None:
    """Check the rank and head layout of q ``[..., Hq, D]`` against k, v ``[..., N, Hkv, D]``."""
    names = "[B, Hq, D]" if q_rank == 3 else "[Hq, D]"
    if len(q_shape) != q_rank:
        raise ConfigError("q.shape", q_shape, f"expected {names}")
    kv_names = "[B, N, Hkv, D]" if q_rank == 3 else "[N, Hkv, D]"
    if len(k_shape) != q_rank + 1:
        raise ConfigError("k.shape", k_shape, f"expected {kv_names}")
    if v_shape != k_shape:
        raise ConfigError("v.shape", v_shape, f"must equal k.shape {k_shape}")
    if q_shape[:-2] != k_shape[:-3]:
        raise ConfigError("k.shape", k_shape, f"batch axis does not match q.shape {q_shape}")
    if k_shape[-1] != q_shape[-1]:
        raise ConfigError("k.shape", k_shape, f"head dimension differs from q.shape {q_shape}")
    hq, hkv = q_shape[-2], k_shape[-2]
    if hkv < 1 or hq % hkv:
        raise ConfigError("q.shape", q_shape, f"Hq={hq} is not a multiple of Hkv={hkv}")


def _check_batched(q: jax.Array, k: jax.Array, v: jax.Array, valid) -> jax.Array:
    """Validate batched q, k, v and return ``valid`` (all True when ``None``) as ``[B, N]``."""
    _check_heads(q.shape, k.shape, v.shape, q_rank=3)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ConfigError(f"{name}.dtype", x.dtype, "expected a float dtype")
    if valid is None:
        return jnp.ones(k.shape[:2], bool)
    valid = jnp.asarray(valid)
    if valid.shape != k.shape[:2]:
        raise ConfigError("valid.shape", valid.shape, f"expected [B, N] = {k.shape[:2]}")
    if valid.dtype != jnp.bool_:
        raise ConfigError("valid.dtype", valid.dtype, "expected bool")
    return valid
