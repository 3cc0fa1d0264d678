// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark harness for `synfleet bench dataplane`.
 *
 * BPF_PROG_TEST_RUN repeats a program on the same skb, and synfleet's programs
 * rewrite their packet (SYN -> SYN+ACK, encapsulation, decapsulation), so a
 * plain repeat would measure the first packet once and its rewrite ever after.
 * bench_restore puts the template frame back on every repetition, then
 * tail-calls the program under test. The restore's own cost is measured by
 * tail-calling bench_noop and subtracted. Paths that encapsulate cannot be
 * repeated on one skb at all (the kernel refuses to encapsulate twice): the
 * benchmark times those one fresh skb per run.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "sf_net.h"

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

SEC("tc")
int bench_restore(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct bench_frame *f = bpf_map_lookup_elem(&template, &zero);
	__u64 len;

	if (!f)
		return TC_ACT_SHOT;
	len = f->len;
	barrier_var(len);
	if (len < 14 || len > BENCH_FRAME_MAX)
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

char _license[] SEC("license") = "Dual BSD/GPL";
