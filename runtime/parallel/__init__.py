"""The tensor-parallel wing: ``comm`` (launch discovery, one process group with timeouts, ``TPComm``),
``sharding`` (the shard plan and a rank's sharded model), ``step`` (rank 0's step broadcast, the workers'
mirrored page pools, the agreement handshake)."""
