"""Other quantization tools run on the same grid. Importing this package registers them all."""

from lowbit.compare.peers import autoround_peer, hqq_peer, llmcompressor_peer  # noqa: F401  (registration side effect)
from lowbit.compare.peers.base import ALIASES, PEERS, Peer, PeerError, PeerJob, PeerResult, expand_peer_names

__all__ = ["ALIASES", "PEERS", "Peer", "PeerError", "PeerJob", "PeerResult", "expand_peer_names"]
