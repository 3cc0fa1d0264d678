// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The SYN generator of `synfleet bench flood`: an XDP program run by
 * BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES) on the
 * attacker's interface, so that each run transmits one frame (XDP_TX) or none
 * (XDP_DROP, to keep the asked rate and to stop on time). Sending costs a few
 * tens of nanoseconds of the generator's CPU instead of a socket write and an
 * skb.
 *
 * The kernel recycles a frame's page without restoring its bytes, and a
 * defence may have rewritten them in place (a SYN+ACK reuses the SYN's
 * buffer): every run writes the whole frame again from `template`.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sf_net.h"
#include "sf_csum.h"

/* Ethernet, IPv4 without options, TCP with 12 option bytes. */
#define SYNGEN_FRAME_LEN 66
#define SYNGEN_IP_OFF 14
#define SYNGEN_TCP_OFF 34
#define SYNGEN_TCP_LEN 32

struct syngen_frame {
	__u8 bytes[SYNGEN_FRAME_LEN];
};

/* One generator runs on one CPU at a time: plain fields, no atomics. */
struct syngen_pace {
	__u64 interval_ns;   /* 0: as fast as the runs go */
	__u64 next_ns;       /* when the schedule sends the next frame */
	__u64 last_ns;       /* when the last frame went */
	__u64 stop_ns;       /* CLOCK_MONOTONIC: nothing is sent from then on */
	__u64 sent;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct syngen_frame);
} template SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct syngen_pace);
} pace SEC(".maps");

/* A generator held off its CPU (its thread preempted, the vCPU stolen) owes
 * the frames its schedule missed: it sends them at up to twice the asked rate
 * until it is back on schedule, rather than losing them or bursting them into
 * the defence's receive ring. */
static __always_inline bool pace_allows(struct syngen_pace *p)
{
	__u64 now = bpf_ktime_get_ns();

	if (now >= p->stop_ns)
		return false;
	if (!p->interval_ns)
		return true;
	if (now < p->next_ns || now - p->last_ns < p->interval_ns / 2)
		return false;
	p->next_ns += p->interval_ns;
	p->last_ns = now;
	return true;
}

/* A random source in the template's /16, a random source port and ISN, and
 * both checksums for them. */
static __always_inline void syn_randomise(void *data)
{
	struct iphdr *ip = data + SYNGEN_IP_OFF;
	struct tcphdr *tcp = data + SYNGEN_TCP_OFF;
	__u32 r = bpf_get_prandom_u32();
	__u64 sum;

	((__u8 *)&ip->saddr)[2] = r;
	((__u8 *)&ip->saddr)[3] = r >> 8;
	tcp->source = r >> 16;
	tcp->seq = bpf_get_prandom_u32();
	ip->check = 0;
	ip->check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
	tcp->check = 0;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)tcp, SYNGEN_TCP_LEN, 0);
	tcp->check = csum_fold32(sum + csum_pseudo_v4(ip->saddr, ip->daddr, IPPROTO_TCP,
						      SYNGEN_TCP_LEN));
}

SEC("xdp")
int syn_flood(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct syngen_frame *frame;
	struct syngen_pace *p;
	__u32 zero = 0;

	p = bpf_map_lookup_elem(&pace, &zero);
	frame = bpf_map_lookup_elem(&template, &zero);
	if (!p || !frame)
		return XDP_ABORTED;
	if (!pace_allows(p))
		return XDP_DROP;
	if (data + SYNGEN_FRAME_LEN > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, frame->bytes, SYNGEN_FRAME_LEN);
	syn_randomise(data);
	p->sent++;
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
