/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps that both programs have, each object its own instance. */
#ifndef SF_MAPS_H
#define SF_MAPS_H

#include "synfleet.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SF_CTR_CAPACITY);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* The agent fills the inactive half of every configuration table, then flips
 * this one word: a packet reads it once and sees the old or the new
 * configuration whole, never a mix. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_SERVICES);
	__type(key, struct sf_endpoint);
	__type(value, struct sf_service);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_POLICIES);
	__type(key, __u32);
	__type(value, struct sf_policy);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_CONFIG_SLOTS);
	__type(key, __u32);
	__type(value, struct sf_config);
} node_config SEC(".maps");

static __always_inline void count(enum sf_counter c)
{
	__u32 key = c;
	__u64 *v = bpf_map_lookup_elem(&counters, &key);

	if (v)
		*v += 1;
}

static __always_inline int drop(enum sf_counter c)
{
	count(c);
	return TC_ACT_SHOT;
}

/* The active configuration half, or NULL before the agent configured one. */
static __always_inline const struct sf_config *config_get(void)
{
	__u32 zero = 0, slot;
	__u32 *active_slot = bpf_map_lookup_elem(&active, &zero);

	if (!active_slot)
		return NULL;
	slot = *active_slot & (SF_CONFIG_SLOTS - 1);
	return bpf_map_lookup_elem(&node_config, &slot);
}

static __always_inline const struct sf_policy *policy_get(const struct sf_config *cfg, __u32 id)
{
	const struct sf_policy *pol;
	__u32 key;

	if (id >= SF_MAX_POLICIES)
		return NULL;
	key = (cfg->slot & (SF_CONFIG_SLOTS - 1)) * SF_MAX_POLICIES + id;
	pol = bpf_map_lookup_elem(&policies, &key);
	return pol && (pol->flags & SF_POLICY_ACTIVE) ? pol : NULL;
}

static __always_inline const struct sf_service *service_find(const struct sf_config *cfg,
							      __u8 family, const void *daddr,
							      __be16 dport)
{
	struct sf_endpoint key = { .family = family, .slot = cfg->slot, .port = dport };

	if (family == SF_FAMILY_IPV4)
		__builtin_memcpy(key.addr, daddr, 4);
	else
		__builtin_memcpy(key.addr, daddr, 16);
	return bpf_map_lookup_elem(&services, &key);
}

#endif /* SF_MAPS_H */
