/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Protocol constants that vmlinux.h (BTF types only) does not carry. */
#ifndef SF_NET_H
#define SF_NET_H

#define ETH_ALEN 6
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7
/* A packet that is not ours goes on to whatever else shares the hook: the next
 * tcx program (a CNI's), or with legacy clsact the next filter (TC_ACT_UNSPEC),
 * and after the last one to the stack. TC_ACT_OK would end the chain there and
 * skip the other programs, so it is kept for packets we changed or assigned. */
#define TCX_NEXT (-1)

/* IPv6 extension headers (RFC 8200 4.1; AH: RFC 4302; Mobility: RFC 6275). */
#define SF_NEXTHDR_HOP 0
#define SF_NEXTHDR_ROUTING 43
#define SF_NEXTHDR_FRAGMENT 44
#define SF_NEXTHDR_AH 51
#define SF_NEXTHDR_DEST 60
#define SF_NEXTHDR_MOBILITY 135
/* Beyond this many extension headers the upper-layer protocol is unknown. */
#define SF_IPV6_EXT_MAX 6

#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10
#define TCP_FLAG_URG 0x20
#define TCP_FLAG_ECE 0x40
#define TCP_FLAG_CWR 0x80
#define TCP_FLAGS_OFFSET 13

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCPOPT_WINDOW 3
#define TCPOPT_SACK_PERM 4
#define TCPOPT_TIMESTAMP 8
#define TCPOLEN_MSS 4
#define TCPOLEN_WINDOW 3
#define TCPOLEN_SACK_PERM 2
#define TCPOLEN_TIMESTAMP 10
#define TCP_MAX_OPTLEN 40

/* RFC 9293 defaults when the SYN carries no MSS option. */
#define TCP_DEFAULT_MSS_V4 536
#define TCP_DEFAULT_MSS_V6 1220

#endif /* SF_NET_H */
