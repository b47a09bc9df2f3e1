"""The memory mechanisms the model builds through memlm.protocols.MemoryMechanism: one line each."""

from memlm.memory.ntm import NtmMemory

MECHANISMS = (NtmMemory,)
