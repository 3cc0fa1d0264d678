/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Internet checksum pieces (RFC 1071) on top of bpf_csum_diff(). */
#ifndef SF_CSUM_H
#define SF_CSUM_H

static __always_inline __u16 csum_fold32(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Pseudo-header partial sum: addresses as they sit in memory, plus protocol
 * and length in network order (one's complement sums are byte-order neutral
 * when every term is added in the same order). */
static __always_inline __u64 csum_pseudo_v4(__be32 saddr, __be32 daddr, __u8 proto, __u16 len)
{
	return (__u64)saddr + daddr + bpf_htons((__u16)proto) + bpf_htons(len);
}

static __always_inline __u64 csum_pseudo_v6(const __u32 *saddr, const __u32 *daddr,
					    __u8 proto, __u16 len)
{
	__u64 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++)
		sum += (__u64)saddr[i] + daddr[i];
	return sum + bpf_htons((__u16)proto) + bpf_htons(len);
}

#endif /* SF_CSUM_H */
