/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps that both programs have, each object its own instance. */
#ifndef SF_MAPS_H
#define SF_MAPS_H

#include "synfleet.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SF_CTR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SF_MAX_SERVICES);
	__type(key, struct sf_endpoint);
	__type(value, struct sf_service);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_MAX_POLICIES);
	__type(key, __u32);
	__type(value, struct sf_policy);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
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

static __always_inline const struct sf_config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&node_config, &zero);
}

static __always_inline const struct sf_policy *policy_get(__u32 id)
{
	const struct sf_policy *pol = bpf_map_lookup_elem(&policies, &id);

	return pol && (pol->flags & SF_POLICY_ACTIVE) ? pol : NULL;
}

static __always_inline const struct sf_service *service_find(__u8 family, const void *daddr,
							      __be16 dport)
{
	struct sf_endpoint key = { .family = family, .port = dport };

	if (family == SF_FAMILY_IPV4)
		__builtin_memcpy(key.addr, daddr, 4);
	else
		__builtin_memcpy(key.addr, daddr, 16);
	return bpf_map_lookup_elem(&services, &key);
}

#endif /* SF_MAPS_H */
