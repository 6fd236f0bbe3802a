"""Flow control: what happens to a request between "it is valid" and "it is routed".

A request may be refused at once (a tenant over its rate limit, a sheddable request
while every pod is saturated), held in the processor until a pod has room or the model's
first pod turns ready (the gRPC stream is simply not answered yet), or routed now.
Queued requests leave by priority, and within a priority round-robin across tenants.

Modules, each one concern: `config` (the YAML file and the header policy), `classify`
(priority and tenant of a request), `saturation` (is a pod full), `queue` (the ordered
wait list), `limits` and `redis_limits` (per-tenant request and token windows), and
`controller` (admission, the wait, and waking it).
"""
