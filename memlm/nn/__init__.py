"""Neural-network layers that know nothing of memory: attention kernels, positions, norms,
feed-forward, attention and the transformer block. Memory mechanisms (memlm.memory) plug into
attention through the protocols of memlm.protocols; this package never imports them."""
