"""The eager reference model: CausalWanDiT, RoPE, KV cache, checkpoint loading."""

from ropesp.model.kv_cache import CacheSlots, KVCache, SlotPlanner
from ropesp.model.wan import CausalWanDiT, init_weights, timestep_sinusoid

__all__ = ["CacheSlots", "CausalWanDiT", "KVCache", "SlotPlanner", "init_weights", "timestep_sinusoid"]
