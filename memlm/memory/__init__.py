"""Memory mechanisms: each module reads and writes its part of the state carried between segments
and offers a layer's attention extra keys and values (xl, compressive, adaptive_span, tokens,
knn/)."""
