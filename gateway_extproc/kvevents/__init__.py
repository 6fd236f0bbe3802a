"""KV-cache events from the engines: what each pod's prefix cache holds, as it reports it.

Modules: `wire` (vLLM's ZMQ/msgpack event format), `keys` (the gateway's chained block
keys over token ids), `index` (per pod, the blocks stored, under those keys), `replay`
(asking a publisher for missed batches), `subscriber` (one SUB socket per pod, sequence
gaps, replays, dead sockets, and when a pod's index can be trusted).
"""
