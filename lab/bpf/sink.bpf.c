// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The attacker's side of `synfleet bench flood`: drop every answer at TC
 * ingress, before the IP stack, so that receiving the SYN+ACKs costs the
 * benchmark as little as possible (the device still counts them).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "sf_net.h"

SEC("tc")
int sink(struct __sk_buff *skb)
{
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
