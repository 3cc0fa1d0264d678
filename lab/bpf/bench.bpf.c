// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark harness for `synfleet bench dataplane`.
 *
 * BPF_PROG_TEST_RUN repeats a program on the same packet, and synfleet's
 * programs rewrite theirs (SYN -> SYN+ACK, decapsulation), so a plain repeat
 * would measure the first packet once and its rewrite ever after.
 * bench_restore (TC) and bench_restore_xdp put the template frame back on
 * every repetition, then tail-call the program under test; their own cost is
 * measured by tail-calling a no-op and subtracted.
 *
 * Paths that encapsulate cannot be repeated on one skb at all (the kernel
 * refuses to encapsulate an skb twice and no helper clears the mark): those
 * programs sit on a tcx hook and bench_inject feeds them fresh skbs, one per
 * frame, through BPF_F_TEST_XDP_LIVE_FRAMES and XDP_PASS; the kernel's
 * run-time statistics time them.
 *
 * The part_* programs each run one piece of a path on its own, so that the
 * benchmark can break a path's cost down.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "synfleet.h"
#include "sf_net.h"
#include "sf_csum.h"
#include "sf_cookie.h"
#include "sf_tcp.h"

#define BENCH_FRAME_MAX 256

struct bench_frame {
	__u32 len;
	__u8 bytes[BENCH_FRAME_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_frame);
} template SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} target SEC(".maps");

/* The template frame and its length, or NULL when there is none of a
 * length a frame can have. */
static __always_inline struct bench_frame *template_get(__u64 *len)
{
	__u32 zero = 0;
	struct bench_frame *f = bpf_map_lookup_elem(&template, &zero);

	if (!f)
		return NULL;
	*len = f->len;
	barrier_var(*len);
	return *len < 14 || *len > BENCH_FRAME_MAX ? NULL : f;
}

SEC("tc")
int bench_restore(struct __sk_buff *skb)
{
	struct bench_frame *f;
	__u64 len;

	f = template_get(&len);
	if (!f)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, len, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, f->bytes, len, 0))
		return TC_ACT_SHOT;
	bpf_tail_call(skb, &target, 0);
	return TC_ACT_SHOT;
}

SEC("tc")
int bench_noop(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xdp_target SEC(".maps");

SEC("xdp")
int bench_restore_xdp(struct xdp_md *ctx)
{
	struct bench_frame *f;
	__u64 len, now;

	f = template_get(&len);
	if (!f)
		return XDP_ABORTED;
	now = ctx->data_end - ctx->data;
	if (now != len && bpf_xdp_adjust_tail(ctx, (int)len - (int)now))
		return XDP_ABORTED;
	if (bpf_xdp_store_bytes(ctx, 0, f->bytes, len))
		return XDP_ABORTED;
	bpf_tail_call(ctx, &xdp_target, 0);
	return XDP_ABORTED;
}

SEC("xdp")
int bench_noop_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* Live frames: the kernel recycles a page without restoring its bytes, and
 * the program under test rewrote them in place (encapsulation pushes headers
 * into the frame's own buffer), so every frame is written again. */
SEC("xdp")
int bench_inject(struct xdp_md *ctx)
{
	struct bench_frame *f;
	__u64 len;

	f = template_get(&len);
	if (!f || ctx->data_end - ctx->data != len)
		return XDP_DROP;
	if (bpf_xdp_store_bytes(ctx, 0, f->bytes, len))
		return XDP_DROP;
	return XDP_PASS;
}

/* ---- the pieces of a path, one program each ---- */

/* Written by each part so that the compiler keeps the work. */
volatile __u64 part_result;

/* Inputs from user space, so that the compiler cannot fold the work away. */
struct part_input {
	__u64 rotation_ns;
	struct sf_salt salt;
	__u64 addr[4];
	__u32 ports;
	__u32 ifindex;
	__be32 src;
	__be32 dst;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct part_input);
} part_inputs SEC(".maps");

static __always_inline const struct part_input *part_input_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&part_inputs, &zero);
}

SEC("tc")
int part_clock(struct __sk_buff *skb)
{
	part_result = bpf_ktime_get_tai_ns();
	return TC_ACT_OK;
}

SEC("tc")
int part_epoch(struct __sk_buff *skb)
{
	const struct part_input *in = part_input_get();

	if (!in || !in->rotation_ns)
		return TC_ACT_SHOT;
	part_result = bpf_ktime_get_tai_ns() / in->rotation_ns;
	return TC_ACT_OK;
}

/* A Linux SYN's 20 option bytes, copied out of the packet and parsed. */
SEC("tc")
int part_options(struct __sk_buff *skb)
{
	struct tcp_optbuf optbuf = {};
	struct tcp_opts o = {};

	if (bpf_skb_load_bytes(skb, 14 + 20 + 20, optbuf.b, 20) || tcp_opts_parse(&optbuf, 20, &o))
		return TC_ACT_SHOT;
	part_result = o.tsval;
	return TC_ACT_OK;
}

SEC("tc")
int part_siphash(struct __sk_buff *skb)
{
	const struct part_input *in = part_input_get();
	struct cookie_tuple t = {};

	if (!in)
		return TC_ACT_SHOT;
	t.addr[0] = in->addr[0];
	t.ports = in->ports;
	t.family = SF_FAMILY_IPV4;
	part_result = cookie_hash(&t, in->ports, &in->salt, 0x3c7);
	return TC_ACT_OK;
}

/* The SYN+ACK's two checksums: a 20-byte IPv4 header and a 40-byte TCP
 * header with its pseudo-header. */
SEC("tc")
int part_checksums(struct __sk_buff *skb)
{
	const struct part_input *in = part_input_get();
	__u32 words[15] = {};
	__s64 ip, tcp;

	if (!in)
		return TC_ACT_SHOT;
	words[0] = bpf_htonl(0x45000034);
	words[3] = in->src;
	words[4] = in->dst;
	words[5] = in->ports;
	ip = bpf_csum_diff(NULL, 0, (__be32 *)words, 20, 0);
	tcp = bpf_csum_diff(NULL, 0, (__be32 *)&words[5], 40, 0);
	part_result = csum_fold32((__u32)ip) ^
		      csum_fold32((__u32)tcp + csum_pseudo_v4(in->src, in->dst, IPPROTO_TCP, 40));
	return TC_ACT_OK;
}

/* The route and neighbour lookup of an encapsulated segment. */
SEC("tc")
int part_fib(struct __sk_buff *skb)
{
	const struct part_input *in = part_input_get();
	struct bpf_fib_lookup fib = {};

	if (!in)
		return TC_ACT_SHOT;
	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.ifindex = in->ifindex;
	fib.ipv4_src = in->src;
	fib.ipv4_dst = in->dst;
	part_result = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	return part_result == BPF_FIB_LKUP_RET_SUCCESS ? TC_ACT_OK : TC_ACT_SHOT;
}

char _license[] SEC("license") = "Dual BSD/GPL";
