/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Making packet headers reachable by direct packet access. */
#ifndef SF_SKB_H
#define SF_SKB_H

/* Ethernet + IPv6 + TCP with the largest options: every header a program reads. */
#define SF_HEADERS_MAX (14 + 40 + 60)

/* Frames whose headers sit in page fragments (a packet socket's TX ring, some
 * drivers) show direct packet access less than their headers: pull them into
 * the linear area first. Its own subprogram so that clang 14 keeps no context
 * field offset in a register across the pull (the verifier rejects that). */
static __noinline int headers_make_linear(struct __sk_buff *skb)
{
	__u32 want = skb->len < SF_HEADERS_MAX ? skb->len : SF_HEADERS_MAX;

	if ((void *)(long)skb->data + want <= (void *)(long)skb->data_end)
		return 0;
	return bpf_skb_pull_data(skb, want);
}

#endif /* SF_SKB_H */
