// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
// svclb's TC program: Kubernetes Service load balancing for IPv4 and IPv6
// TCP/UDP.
//
// Attached to TC ingress of the router's interfaces. A packet to a frontend
// (VIP, port, protocol) is DNATed to a backend: the tracked one when the
// conntrack map has the flow, else the Maglev choice (table[hash % M]), which
// src/ebpf/model.rs reproduces in userspace. A reply from a backend is
// reverse-NATed back to the VIP. Frontends without a backend REJECT (TCP: an
// RST, UDP: ICMP port unreachable, sent back out of the same interface) or
// DROP (Local policy). IPv6 has maps of its own (svclb_frontend6,
// svclb_backend6, svclb_ct6, svclb_rnat6, as Cilium's lb6_* maps; names
// under the kernel's 15 characters) and
// shares the Maglev tables and counters; its REJECT is a TCP RST or ICMPv6
// port unreachable. ICMP(v6) errors from a backend about a DNATed flow are
// reverse-NATed, quote included (icmp4_error). IPv6 extension headers
// (up to MAX_EXTHDRS) are skipped to reach TCP/UDP. Fragments: the first
// one is handled by its ports and records them (svclb_frag4/6); later ones
// take them from there, or pass untouched when the first was not seen.
// Everything else passes untouched.
//
// Keep the structs in step with src/ebpf/loader.rs.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_FRONTENDS 65536
#define MAX_BACKENDS 65536
/* Slots per table-map value: 1008 ids (4032 bytes) make a table-map
 * element exactly one page (see svclb_tables). */
#define TABLE_CHUNK 1008
#define MAX_CHUNKS 131              /* 131071 slots at most */
#define CT_ENTRIES 262144

#define FE_REJECT_WHEN_EMPTY 1

#define BE_ACTIVE 0
#define BE_DRAINING 1

/* conntrack states */
#define CT_SYN 1
#define CT_ESTABLISHED 2
#define CT_FIN 3   /* a FIN seen in either direction */
#define CT_CLOSED 4 /* RST, or FINs both ways */
#define CT_UDP 5

#define NS 1000000000ULL
/* Cilium's agent defaults (bpf-ct-timeout-*). */
#define TIMEOUT_SYN (60 * NS)
#define TIMEOUT_TCP (8000 * NS)
#define TIMEOUT_FIN (10 * NS)
#define TIMEOUT_UDP (60 * NS)

#define FLOW_HASH_SEED 0x9747b28cU
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PORT_UNREACH 4

enum counter {
	C_PACKETS = 0,      /* every IPv4 or IPv6 TCP/UDP packet seen */
	C_NEW,              /* new connections scheduled */
	C_TRACKED,          /* packets of tracked connections (original dir) */
	C_REPLIES,          /* reverse-NATed replies */
	C_REJECT_RST,       /* RSTs sent for frontends without backends */
	C_REJECT_ICMP,      /* ICMP(v6) port unreachable sent for UDP to frontends without backends */
	C_DROP_LOCAL,       /* dropped: Local policy, no local backend */
	C_DROP_NO_BACKEND,  /* dropped: table names a backend the map lacks */
	C_DROP_MALFORMED,   /* dropped: truncated headers, or a rewrite failed */
	C_RESCHEDULED,      /* tracked flows whose backend was gone or a SYN to a draining one */
	C_PASS_FRAGMENT,    /* non-first fragments whose first fragment was not seen, passed untouched */
	C_ICMP_ERRORS,      /* ICMP(v6) errors about a DNATed flow, reverse-NATed */
	C_FRAGMENTS,        /* non-first fragments NATed with the ports of their first fragment */
	C_PASS_EXTHDR,      /* IPv6 packets whose extension headers are too many or too long, passed */
	C_MAX,
};

struct fe_key {
	__u32 vip;   /* network order */
	__u16 port;  /* network order */
	__u8 proto;
	__u8 pad;
};

struct fe_val {
	__u32 id;
	__u32 count;      /* backends in the table; 0 = reject or drop */
	__u32 flags;
	__u32 table_size; /* M, a prime <= MAX_CHUNKS * TABLE_CHUNK */
	__u32 version;    /* which of the two table copies is live: 0 or 1 */
	__u32 pad;
};

struct be_val {
	__u32 addr; /* network order */
	__u16 port; /* network order */
	__u8 state;
	__u8 pad;
};

struct table_key {
	__u32 fe_id;
	__u16 version;
	__u16 chunk;
};

struct table_val {
	__u32 ids[TABLE_CHUNK];
};

struct ct_key { /* the client's tuple: client -> VIP */
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_val {
	__u64 expires; /* bpf_ktime_get_ns() deadline */
	__u32 backend_id;
	__u32 fe_id;
	__u8 state;
	__u8 fin_seen; /* bit 0: from the client, bit 1: from the backend */
	__u16 pad;
	__u32 pad2;
};

struct rnat_key { /* the backend's reply tuple: backend -> client */
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct rnat_val {
	__u32 vip;
	__u16 vport;
	__u16 pad;
};

/* IPv6: the same, with 16-byte addresses (network order). */
struct fe6_key {
	__u32 vip[4];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct be6_val {
	__u32 addr[4];
	__u16 port;
	__u8 state;
	__u8 pad;
};

struct ct6_key { /* the client's tuple (svclb_ct6), or a backend's (svclb_rnat6) */
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct rnat6_val {
	__u32 vip[4];
	__u16 vport;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FRONTENDS);
	__type(key, struct fe_key);
	__type(value, struct fe_val);
} svclb_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct be_val);
} svclb_backends SEC(".maps");

/* Double-buffered Maglev tables: (frontend, version, chunk) -> 1008 ids. A
 * rewrite fills the other version, then flips fe_val.version in one update.
 *
 * Not preallocated (most frontends' tables are small), so each element is
 * allocated when written, from the BPF memory allocator's per-CPU cache,
 * which refills from irq_work with GFP_NOWAIT (kernel/bpf/memalloc.c): no
 * reclaim. An element is 64 bytes of header (struct htab_elem, the key, the
 * allocator's link) plus the value; with 4096-id values it was 16,448
 * bytes, which kmalloc serves as an order-3 (32 KiB) page block, so 10,000
 * frontends needed 10,000 such blocks without reclaim and failed with
 * ENOMEM when free memory was short (page cache fills it). With 1008 ids
 * an element is exactly 4096 bytes: kmalloc-4k, one page, half the memory
 * of the old layout for the same tables. 262144 entries cost only the
 * bucket array (4 MiB) until written. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct table_key);
	__type(value, struct table_val);
} svclb_tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_ENTRIES);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
} svclb_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_ENTRIES);
	__type(key, struct rnat_key);
	__type(value, struct rnat_val);
} svclb_rnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FRONTENDS);
	__type(key, struct fe6_key);
	__type(value, struct fe_val);
} svclb_frontend6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct be6_val);
} svclb_backend6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_ENTRIES);
	__type(key, struct ct6_key);
	__type(value, struct ct_val);
} svclb_ct6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_ENTRIES);
	__type(key, struct ct6_key);
	__type(value, struct rnat6_val);
} svclb_rnat6 SEC(".maps");

/* Fragments, as Cilium's IPV4_FRAG_DATAGRAMS_MAP / IPV6_FRAG_DATAGRAMS_MAP
 * (bpf/lib/ipv4.h, ipv6.h): a first fragment (offset 0, more fragments)
 * records its ports under (source, destination, IP id, protocol); later
 * fragments of the same datagram, which carry no L4 header, take their
 * ports from it and so follow the first fragment's conntrack entry (an L3
 * rewrite only: the L4 checksum is in the first fragment). */
struct frag4_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8 proto;
	__u8 pad;
};

struct frag6_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_ports {
	__u16 sport;
	__u16 dport;
};

#define FRAG_ENTRIES 8192

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FRAG_ENTRIES);
	__type(key, struct frag4_key);
	__type(value, struct frag_ports);
} svclb_frag4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FRAG_ENTRIES);
	__type(key, struct frag6_key);
	__type(value, struct frag_ports);
} svclb_frag6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} svclb_counters SEC(".maps");

static __always_inline void count(__u32 c)
{
	__u64 *v = bpf_map_lookup_elem(&svclb_counters, &c);
	if (v)
		*v += 1;
}

static __always_inline __u64 rotl64(__u64 x, int r)
{
	return (x << r) | (x >> (64 - r));
}

static __always_inline __u64 fmix64(__u64 k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	k *= 0xc4ceb9fe1a85ec53ULL;
	k ^= k >> 33;
	return k;
}

/* Katran's MurmurHash3_x64_64(A, B, seed); the model's murmur3_x64_64. */
static __always_inline __u64 murmur3_x64_64(__u64 a, __u64 b, __u32 seed)
{
	const __u64 c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
	__u64 h1 = seed, h2 = seed;
	__u64 k1 = a * c1;
	k1 = rotl64(k1, 31) * c2;
	h1 ^= k1;
	h1 = rotl64(h1, 27) + h2;
	h1 = h1 * 5 + 0x52dce729;
	__u64 k2 = b * c2;
	k2 = rotl64(k2, 33) * c1;
	h2 ^= k2;
	h2 = rotl64(h2, 31) + h1;
	h2 = h2 * 5 + 0x38495ab5;
	h1 ^= 16;
	h2 ^= 16;
	h1 += h2;
	h2 += h1;
	h1 = fmix64(h1);
	h2 = fmix64(h2);
	return h1 + h2;
}

static __always_inline __u64 flow_hash(const struct ct_key *k)
{
	__u64 a = ((__u64)bpf_ntohl(k->saddr) << 32) | bpf_ntohl(k->daddr);
	__u64 b = ((__u64)bpf_ntohs(k->sport) << 48) | ((__u64)bpf_ntohs(k->dport) << 32) | k->proto;
	return murmur3_x64_64(a, b, FLOW_HASH_SEED);
}

/* IPv6 folds each address to 32 bits first: murmur3_x64_64(hi, lo, 0) for
 * the source, (.., 1) for the destination (the model's flow_hash). */
static __always_inline __u64 addr6_word(const __u32 *a, __u32 salt)
{
	__u64 hi = ((__u64)bpf_ntohl(a[0]) << 32) | bpf_ntohl(a[1]);
	__u64 lo = ((__u64)bpf_ntohl(a[2]) << 32) | bpf_ntohl(a[3]);
	return murmur3_x64_64(hi, lo, salt) & 0xffffffffULL;
}

static __always_inline __u64 flow_hash6(const struct ct6_key *k)
{
	__u64 a = (addr6_word(k->saddr, 0) << 32) | addr6_word(k->daddr, 1);
	__u64 b = ((__u64)bpf_ntohs(k->sport) << 48) | ((__u64)bpf_ntohs(k->dport) << 32) | k->proto;
	return murmur3_x64_64(a, b, FLOW_HASH_SEED);
}

#define ETH_OFF 0
#define IP_OFF (sizeof(struct ethhdr))
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_SRC_OFF (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (IP_OFF + offsetof(struct iphdr, daddr))

static __always_inline __u32 l4_csum_off(__u32 l4, __u8 proto)
{
	return l4 + (proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
}

/* Rewrite one address (src or dst) and port, with L3 and L4 checksums;
 * without `has_l4` (a non-first fragment) only the address and the IP
 * header checksum. */
static __always_inline int rewrite(struct __sk_buff *skb, __u32 l4, __u8 proto, int dst,
				   __u32 old_ip, __u32 new_ip, __u16 old_port, __u16 new_port,
				   int has_l4)
{
	if (!has_l4) {
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, dst ? IP_DST_OFF : IP_SRC_OFF, &new_ip,
					   sizeof(new_ip), 0) < 0 ? -1 : 0;
	}
	__u32 csum_off = l4_csum_off(l4, proto);
	__u64 flags = BPF_F_PSEUDO_HDR | sizeof(new_ip);
	if (proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip, flags) < 0)
		return -1;
	__u64 pflags = sizeof(new_port);
	if (proto == IPPROTO_UDP)
		pflags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, pflags) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, dst ? IP_DST_OFF : IP_SRC_OFF, &new_ip, sizeof(new_ip), 0) < 0)
		return -1;
	/* source port at l4 + 0, destination port at l4 + 2 for TCP and UDP */
	if (bpf_skb_store_bytes(skb, l4 + (dst ? 2 : 0), &new_port, sizeof(new_port), 0) < 0)
		return -1;
	return 0;
}

#define IP6_SRC_OFF (IP_OFF + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (IP_OFF + offsetof(struct ipv6hdr, daddr))

/* The same for IPv6: no IP header checksum; the 16-byte address change
 * goes into the L4 checksum as one difference through its pseudo-header. */
static __always_inline int rewrite6(struct __sk_buff *skb, __u32 l4, __u8 proto, int dst,
				    __u32 *old_ip, __u32 *new_ip, __u16 old_port, __u16 new_port,
				    int has_l4)
{
	if (!has_l4)
		return bpf_skb_store_bytes(skb, dst ? IP6_DST_OFF : IP6_SRC_OFF, new_ip, 16, 0) < 0
			       ? -1 : 0;
	__u32 csum_off = l4_csum_off(l4, proto);
	__s64 diff = bpf_csum_diff(old_ip, 16, new_ip, 16, 0);
	if (diff < 0)
		return -1;
	__u64 flags = BPF_F_PSEUDO_HDR;
	__u64 pflags = sizeof(new_port);
	if (proto == IPPROTO_UDP) {
		flags |= BPF_F_MARK_MANGLED_0;
		pflags |= BPF_F_MARK_MANGLED_0;
	}
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, flags) < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, pflags) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, dst ? IP6_DST_OFF : IP6_SRC_OFF, new_ip, 16, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, l4 + (dst ? 2 : 0), &new_port, sizeof(new_port), 0) < 0)
		return -1;
	return 0;
}

static __always_inline __u16 csum_fold(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

struct rst_pseudo {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;
	struct tcphdr tcp;
};

/* Turn a TCP segment into the RST that answers it and send it back out of
 * the interface it came in on (kube-proxy's REJECT --reject-with tcp-reset). */
static __always_inline int reject_tcp(struct __sk_buff *skb, __u32 l4)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > end || ip->ihl != 5)
		return TC_ACT_SHOT;
	struct tcphdr *tcp = data + l4;
	if ((void *)(tcp + 1) > end)
		return TC_ACT_SHOT;
	if (tcp->rst)
		return TC_ACT_SHOT;
	__u32 payload = bpf_ntohs(ip->tot_len) - ip->ihl * 4 - tcp->doff * 4;
	struct rst_pseudo p = {};
	p.saddr = ip->daddr;
	p.daddr = ip->saddr;
	p.proto = IPPROTO_TCP;
	p.len = bpf_htons(sizeof(struct tcphdr));
	p.tcp.source = tcp->dest;
	p.tcp.dest = tcp->source;
	p.tcp.doff = 5;
	p.tcp.rst = 1;
	if (tcp->ack) {
		p.tcp.seq = tcp->ack_seq;
	} else {
		p.tcp.ack = 1;
		p.tcp.ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + payload + tcp->syn + tcp->fin);
	}
	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	struct iphdr nip = *ip;
	nip.saddr = p.saddr;
	nip.daddr = p.daddr;
	nip.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
	nip.ttl = 64;
	nip.frag_off = bpf_htons(0x4000); /* DF */
	nip.check = 0;
	nip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&nip, sizeof(nip), 0));
	*ip = nip;
	p.tcp.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&p, sizeof(p), 0));
	*tcp = p.tcp;
	if (bpf_skb_change_tail(skb, l4 + sizeof(struct tcphdr), 0) < 0)
		return TC_ACT_SHOT;
	count(C_REJECT_RST);
	return bpf_redirect(skb->ifindex, 0);
}

/* Answer a UDP datagram with ICMP port unreachable (kube-proxy's REJECT,
 * icmp-port-unreachable), sent back out of the interface it came in on:
 * 28 bytes are opened before the original IP header for the new IP and
 * ICMP headers, and the original is cut to its IP header + 8 bytes. */
static __always_inline int reject_udp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > end || ip->ihl != 5)
		return TC_ACT_SHOT;
	struct iphdr nip = {};
	nip.version = 4;
	nip.ihl = 5;
	nip.ttl = 64;
	nip.protocol = IPPROTO_ICMP;
	nip.saddr = ip->daddr;
	nip.daddr = ip->saddr;
	nip.tot_len = bpf_htons(sizeof(struct iphdr) + 8 + sizeof(struct iphdr) + 8);
	nip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&nip, sizeof(nip), 0));
	unsigned char mac[2 * ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(mac + ETH_ALEN, eth->h_dest, ETH_ALEN);
	/* the original IP header and the first 8 bytes of UDP; the new headers
	 * go between L2 and L3 (BPF_ADJ_ROOM_MAC) */
	__u32 orig[7];
	if (bpf_skb_load_bytes(skb, IP_OFF, orig, sizeof(orig)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, IP_OFF + sizeof(orig), 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_adjust_room(skb, sizeof(nip) + 8, BPF_ADJ_ROOM_MAC, 0) < 0)
		return TC_ACT_SHOT;
	struct {
		__u8 type;
		__u8 code;
		__u16 check;
		__u32 unused;
	} icmp = {.type = ICMP_DEST_UNREACH, .code = ICMP_PORT_UNREACH};
	__u32 c = bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), 0);
	c = bpf_csum_diff(0, 0, orig, sizeof(orig), c);
	icmp.check = csum_fold(c);
	struct {
		unsigned char dst[ETH_ALEN];
		unsigned char src[ETH_ALEN];
	} macs;
	__builtin_memcpy(macs.dst, mac, ETH_ALEN);
	__builtin_memcpy(macs.src, mac + ETH_ALEN, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &macs, sizeof(macs), 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF, &nip, sizeof(nip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + sizeof(nip), &icmp, sizeof(icmp), 0) < 0)
		return TC_ACT_SHOT;
	count(C_REJECT_ICMP);
	return bpf_redirect(skb->ifindex, 0);
}

struct rst6_pseudo {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 len;
	__u8 zero[3];
	__u8 nexthdr;
	struct tcphdr tcp;
};

/* reject_tcp for IPv6 (ip6tables' REJECT --reject-with tcp-reset). */
static __always_inline int reject_tcp6(struct __sk_buff *skb, __u32 l4)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + IP_OFF;
	if ((void *)(ip6 + 1) > end)
		return TC_ACT_SHOT;
	struct tcphdr *tcp = data + l4;
	if ((void *)(tcp + 1) > end)
		return TC_ACT_SHOT;
	if (tcp->rst)
		return TC_ACT_SHOT;
	__u32 payload = bpf_ntohs(ip6->payload_len) - tcp->doff * 4;
	struct rst6_pseudo p = {};
	__builtin_memcpy(p.saddr, &ip6->daddr, 16);
	__builtin_memcpy(p.daddr, &ip6->saddr, 16);
	p.len = bpf_htonl(sizeof(struct tcphdr));
	p.nexthdr = IPPROTO_TCP;
	p.tcp.source = tcp->dest;
	p.tcp.dest = tcp->source;
	p.tcp.doff = 5;
	p.tcp.rst = 1;
	if (tcp->ack) {
		p.tcp.seq = tcp->ack_seq;
	} else {
		p.tcp.ack = 1;
		p.tcp.ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + payload + tcp->syn + tcp->fin);
	}
	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	__builtin_memcpy(&ip6->saddr, p.saddr, 16);
	__builtin_memcpy(&ip6->daddr, p.daddr, 16);
	ip6->payload_len = bpf_htons(sizeof(struct tcphdr));
	ip6->hop_limit = 64;
	p.tcp.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&p, sizeof(p), 0));
	*tcp = p.tcp;
	if (bpf_skb_change_tail(skb, l4 + sizeof(struct tcphdr), 0) < 0)
		return TC_ACT_SHOT;
	count(C_REJECT_RST);
	return bpf_redirect(skb->ifindex, 0);
}

/* reject_udp for IPv6: ICMPv6 port unreachable (type 1, code 4) carrying
 * the original IPv6 header and 8 bytes of UDP; 48 bytes are opened before
 * the original IPv6 header for the new IPv6 and ICMPv6 headers. */
static __always_inline int reject_udp6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + IP_OFF;
	if ((void *)(ip6 + 1) > end)
		return TC_ACT_SHOT;
	struct {
		__u32 saddr[4];
		__u32 daddr[4];
		__u32 len;
		__u8 zero[3];
		__u8 nexthdr;
	} ph = {};
	__builtin_memcpy(ph.saddr, &ip6->daddr, 16);
	__builtin_memcpy(ph.daddr, &ip6->saddr, 16);
	ph.len = bpf_htonl(8 + sizeof(struct ipv6hdr) + 8);
	ph.nexthdr = IPPROTO_ICMPV6;
	struct ipv6hdr nip = {};
	nip.version = 6;
	nip.payload_len = bpf_htons(8 + sizeof(struct ipv6hdr) + 8);
	nip.nexthdr = IPPROTO_ICMPV6;
	nip.hop_limit = 64;
	__builtin_memcpy(&nip.saddr, ph.saddr, 16);
	__builtin_memcpy(&nip.daddr, ph.daddr, 16);
	unsigned char mac[2 * ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(mac + ETH_ALEN, eth->h_dest, ETH_ALEN);
	__u32 orig[12];
	if (bpf_skb_load_bytes(skb, IP_OFF, orig, sizeof(orig)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, IP_OFF + sizeof(orig), 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_adjust_room(skb, sizeof(nip) + 8, BPF_ADJ_ROOM_MAC, 0) < 0)
		return TC_ACT_SHOT;
	struct {
		__u8 type;
		__u8 code;
		__u16 check;
		__u32 unused;
	} icmp = {.type = ICMPV6_DEST_UNREACH, .code = ICMPV6_PORT_UNREACH};
	__u32 c = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	c = bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), c);
	c = bpf_csum_diff(0, 0, orig, sizeof(orig), c);
	icmp.check = csum_fold(c);
	struct {
		unsigned char dst[ETH_ALEN];
		unsigned char src[ETH_ALEN];
	} macs;
	__builtin_memcpy(macs.dst, mac, ETH_ALEN);
	__builtin_memcpy(macs.src, mac + ETH_ALEN, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &macs, sizeof(macs), 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF, &nip, sizeof(nip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, IP_OFF + sizeof(nip), &icmp, sizeof(icmp), 0) < 0)
		return TC_ACT_SHOT;
	count(C_REJECT_ICMP);
	return bpf_redirect(skb->ifindex, 0);
}

/* One's complement arithmetic on 16-bit words as they lie in memory
 * (RFC 1624): a sum of ~old + new terms, folded, then applied to a
 * checksum field. */
static __always_inline __u32 csum_word(__u32 acc, __u16 old, __u16 new)
{
	return acc + (__u16)~old + new;
}

static __always_inline __u32 csum_addr(__u32 acc, __u32 old, __u32 new)
{
	acc = csum_word(acc, old & 0xffff, new & 0xffff);
	return csum_word(acc, old >> 16, new >> 16);
}

static __always_inline __u32 csum_addr6(__u32 acc, const __u32 *old, const __u32 *new)
{
	for (int i = 0; i < 4; i++)
		acc = csum_addr(acc, old[i], new[i]);
	return acc;
}

static __always_inline __u32 csum_fold16(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return c;
}

/* HC' = ~(~HC + sum), RFC 1624 eqn. 3 */
static __always_inline __u16 csum_apply(__u16 check, __u32 sum)
{
	return (__u16)~csum_fold16((__u16)~check + csum_fold16(sum));
}

#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4

struct icmp_hdr {
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 rest;
};

/* The embedded packet's L4 checksum, updated for `sum` (its pseudo-header
 * address and its port), when the error quotes it: UDP's always lies in
 * the 8 bytes an ICMP error must quote, TCP's (offset 16) when the error
 * quotes more, as Linux's do (nf_nat's l4proto manip skips it likewise
 * when it is cut off). Adds the field's own change to *icmp_sum. */
static __always_inline int inner_l4_csum(struct __sk_buff *skb, __u32 il4, __u8 proto, __u32 sum,
					 __u32 *icmp_sum)
{
	__u32 off = il4 + (proto == IPPROTO_TCP ? 16 : 6);
	__u16 check;
	if (bpf_skb_load_bytes(skb, off, &check, sizeof(check)) < 0)
		return 0; /* not quoted */
	if (proto == IPPROTO_UDP && check == 0)
		return 0; /* IPv4 UDP without a checksum */
	__u16 ncheck = csum_apply(check, sum);
	if (proto == IPPROTO_UDP && ncheck == 0)
		ncheck = 0xffff;
	*icmp_sum = csum_word(*icmp_sum, check, ncheck);
	return bpf_skb_store_bytes(skb, off, &ncheck, sizeof(ncheck), 0);
}

/* An ICMP error from a backend about a DNATed flow (destination or port
 * unreachable, fragmentation needed, time exceeded, parameter problem)
 * quotes the packet the backend got: client -> backend. It is reverse-NATed
 * as the kernel's NAT does (nf_nat_icmp_reply_translation): the quoted
 * destination becomes the VIP and port again, with the quoted IP and L4
 * checksums, the ICMP checksum (which covers the quote) is updated for
 * those changes, and the outer source becomes the VIP. The client's kernel
 * matches the quote against its socket, so only then does it see the
 * error (ECONNREFUSED, a path MTU). An error about a reply (quoting VIP ->
 * client) goes the other way, to the backend (below). */
static __always_inline int icmp4_error(struct __sk_buff *skb, __u32 l4)
{
	struct icmp_hdr ih;
	if (bpf_skb_load_bytes(skb, l4, &ih, sizeof(ih)) < 0)
		return TC_ACT_OK;
	if (ih.type != ICMP_DEST_UNREACH && ih.type != ICMP_TIME_EXCEEDED &&
	    ih.type != ICMP_PARAMETERPROB)
		return TC_ACT_OK;
	__u32 ioff = l4 + sizeof(ih);
	struct iphdr in;
	if (bpf_skb_load_bytes(skb, ioff, &in, sizeof(in)) < 0)
		return TC_ACT_OK;
	if (in.ihl != 5 || (in.protocol != IPPROTO_TCP && in.protocol != IPPROTO_UDP))
		return TC_ACT_OK;
	__u32 il4 = ioff + sizeof(in);
	__u16 iports[2];
	if (bpf_skb_load_bytes(skb, il4, iports, sizeof(iports)) < 0)
		return TC_ACT_OK;
	/* A backend's error about what it got (client -> backend): the
	 * quote's reply tuple is in svclb_rnat; the quote's destination and
	 * the outer source go back to the VIP. An error about a reply (VIP ->
	 * client), from the client or a router on its way: the quote's
	 * client tuple is in svclb_ct; the quote's source and the outer
	 * destination become the backend's, so that the backend gets it
	 * (e.g. a path MTU), as the kernel's NAT does in that direction. */
	int to_client = 1;
	__u32 nip;
	__u16 nport;
	struct rnat_key rk = {.saddr = in.daddr, .daddr = in.saddr, .sport = iports[1],
			      .dport = iports[0], .proto = in.protocol};
	struct rnat_val *rn = bpf_map_lookup_elem(&svclb_rnat, &rk);
	if (rn) {
		nip = rn->vip;
		nport = rn->vport;
	} else {
		struct ct_key ck = {.saddr = rk.saddr, .daddr = rk.daddr, .sport = rk.sport,
				    .dport = rk.dport, .proto = rk.proto};
		struct ct_val *ct = bpf_map_lookup_elem(&svclb_ct, &ck);
		if (!ct)
			return TC_ACT_OK;
		struct be_val *be = bpf_map_lookup_elem(&svclb_backends, &ct->backend_id);
		if (!be)
			return TC_ACT_OK;
		nip = be->addr;
		nport = be->port;
		to_client = 0;
	}
	__u32 oip = to_client ? in.daddr : in.saddr;
	__u16 oport = to_client ? iports[1] : iports[0];
	__u32 qaddr = ioff + (to_client ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
	__u32 qport = il4 + (to_client ? 2 : 0);
	__u32 icmp_sum = 0;
	/* the quoted IP header: the address and the header checksum */
	__u16 ncheck = csum_apply(in.check, csum_addr(0, oip, nip));
	icmp_sum = csum_addr(icmp_sum, oip, nip);
	icmp_sum = csum_word(icmp_sum, in.check, ncheck);
	/* the quoted L4 header: the port and the checksum */
	__u32 l4sum = csum_word(csum_addr(0, oip, nip), oport, nport);
	icmp_sum = csum_word(icmp_sum, oport, nport);
	if (inner_l4_csum(skb, il4, in.protocol, l4sum, &icmp_sum) < 0 ||
	    bpf_skb_store_bytes(skb, qaddr, &nip, sizeof(nip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ioff + offsetof(struct iphdr, check), &ncheck, sizeof(ncheck), 0) < 0 ||
	    bpf_skb_store_bytes(skb, qport, &nport, sizeof(nport), 0) < 0 ||
	    bpf_l4_csum_replace(skb, l4 + offsetof(struct icmp_hdr, check), 0, csum_fold16(icmp_sum), 0) < 0)
		goto bad;
	/* the outer address (ICMP has no pseudo-header: its checksum stays) */
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > end)
		goto bad;
	__u32 outer = to_client ? ip->saddr : ip->daddr;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, outer, nip, sizeof(nip)) < 0 ||
	    bpf_skb_store_bytes(skb, to_client ? IP_SRC_OFF : IP_DST_OFF, &nip, sizeof(nip), 0) < 0)
		goto bad;
	count(C_ICMP_ERRORS);
	return TC_ACT_OK;
bad:
	count(C_DROP_MALFORMED);
	return TC_ACT_SHOT;
}

/* icmp4_error for ICMPv6 (destination unreachable, packet too big, time
 * exceeded, parameter problem): the quoted IPv6 address and port, the
 * quoted L4 checksum, and the outer address, which the ICMPv6 checksum
 * covers through its pseudo-header. A quote with extension headers is
 * passed untouched. */
static __always_inline int icmp6_error(struct __sk_buff *skb, __u32 l4)
{
	struct icmp_hdr ih;
	if (bpf_skb_load_bytes(skb, l4, &ih, sizeof(ih)) < 0)
		return TC_ACT_OK;
	if (ih.type != ICMPV6_DEST_UNREACH && ih.type != ICMPV6_PKT_TOOBIG &&
	    ih.type != ICMPV6_TIME_EXCEED && ih.type != ICMPV6_PARAMPROB)
		return TC_ACT_OK;
	__u32 ioff = l4 + sizeof(ih);
	struct ipv6hdr in;
	if (bpf_skb_load_bytes(skb, ioff, &in, sizeof(in)) < 0)
		return TC_ACT_OK;
	if (in.nexthdr != IPPROTO_TCP && in.nexthdr != IPPROTO_UDP)
		return TC_ACT_OK;
	__u32 il4 = ioff + sizeof(in);
	__u16 iports[2];
	if (bpf_skb_load_bytes(skb, il4, iports, sizeof(iports)) < 0)
		return TC_ACT_OK;
	struct ct6_key rk = {.sport = iports[1], .dport = iports[0], .proto = in.nexthdr};
	__builtin_memcpy(rk.saddr, &in.daddr, 16);
	__builtin_memcpy(rk.daddr, &in.saddr, 16);
	/* both directions, as in icmp4_error */
	int to_client = 1;
	__u32 nip[4];
	__u16 nport;
	struct rnat6_val *rn = bpf_map_lookup_elem(&svclb_rnat6, &rk);
	if (rn) {
		__builtin_memcpy(nip, rn->vip, 16);
		nport = rn->vport;
	} else {
		struct ct_val *ct = bpf_map_lookup_elem(&svclb_ct6, &rk);
		if (!ct)
			return TC_ACT_OK;
		struct be6_val *be = bpf_map_lookup_elem(&svclb_backend6, &ct->backend_id);
		if (!be)
			return TC_ACT_OK;
		__builtin_memcpy(nip, be->addr, 16);
		nport = be->port;
		to_client = 0;
	}
	/* rk.saddr is the quote's destination, rk.daddr its source */
	__u32 *oip = to_client ? rk.saddr : rk.daddr;
	__u16 oport = to_client ? iports[1] : iports[0];
	__u32 qaddr = ioff + (to_client ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
	__u32 qport = il4 + (to_client ? 2 : 0);
	__u32 icmp_sum = csum_addr6(0, oip, nip);
	__u32 l4sum = csum_word(csum_addr6(0, oip, nip), oport, nport);
	icmp_sum = csum_word(icmp_sum, oport, nport);
	if (inner_l4_csum(skb, il4, in.nexthdr, l4sum, &icmp_sum) < 0 ||
	    bpf_skb_store_bytes(skb, qaddr, nip, 16, 0) < 0 ||
	    bpf_skb_store_bytes(skb, qport, &nport, sizeof(nport), 0) < 0 ||
	    bpf_l4_csum_replace(skb, l4 + offsetof(struct icmp_hdr, check), 0, csum_fold16(icmp_sum), 0) < 0)
		goto bad;
	/* the outer address, which the ICMPv6 checksum covers through its
	 * pseudo-header */
	__u32 outer_off = to_client ? IP6_SRC_OFF : IP6_DST_OFF;
	__u32 outer[4];
	if (bpf_skb_load_bytes(skb, outer_off, outer, 16) < 0)
		goto bad;
	__u32 psum = csum_addr6(0, outer, nip);
	if (bpf_l4_csum_replace(skb, l4 + offsetof(struct icmp_hdr, check), 0, csum_fold16(psum),
				BPF_F_PSEUDO_HDR) < 0 ||
	    bpf_skb_store_bytes(skb, outer_off, nip, 16, 0) < 0)
		goto bad;
	count(C_ICMP_ERRORS);
	return TC_ACT_OK;
bad:
	count(C_DROP_MALFORMED);
	return TC_ACT_SHOT;
}

/* The Maglev pick for a new flow: table[hash % M] of the live copy. */
static __always_inline int table_pick(const struct fe_val *fe, __u64 hash, __u32 *backend_id)
{
	__u32 m = fe->table_size;
	if (m == 0 || m > MAX_CHUNKS * TABLE_CHUNK)
		return -1;
	__u64 slot = hash % m;
	__u64 chunk = slot / TABLE_CHUNK;
	__u64 idx = slot - chunk * TABLE_CHUNK;
	struct table_key tk = {.fe_id = fe->id, .version = fe->version, .chunk = chunk};
	struct table_val *tv = bpf_map_lookup_elem(&svclb_tables, &tk);
	if (!tv)
		return -1;
	/* clang knows idx < TABLE_CHUNK and would drop the check the verifier
	 * needs (it does not follow the division): hide idx from it */
	asm volatile("" : "+r"(idx));
	if (idx >= TABLE_CHUNK)
		return -1;
	*backend_id = tv->ids[idx];
	return 0;
}

static __always_inline void ct_update(struct ct_val *ct, __u8 proto, int from_backend, __u8 flags,
				      __u64 now)
{
	if (proto != IPPROTO_TCP) {
		ct->state = CT_UDP;
		ct->expires = now + TIMEOUT_UDP;
		return;
	}
	/* tcp flag byte: FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10 */
	if (flags & 0x04) {
		ct->state = CT_CLOSED;
	} else if (flags & 0x01) {
		ct->fin_seen |= from_backend ? 2 : 1;
		ct->state = ct->fin_seen == 3 ? CT_CLOSED : CT_FIN;
	} else if (ct->state == CT_SYN && (flags & 0x10) && !from_backend) {
		ct->state = CT_ESTABLISHED;
	}
	switch (ct->state) {
	case CT_SYN:
		ct->expires = now + TIMEOUT_SYN;
		break;
	case CT_ESTABLISHED:
		ct->expires = now + TIMEOUT_TCP;
		break;
	default:
		ct->expires = now + TIMEOUT_FIN;
	}
}

static __always_inline int handle4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return TC_ACT_OK;
	__u8 proto = ip->protocol;
	__u32 l4 = IP_OFF + ip->ihl * 4;
	if (proto == IPPROTO_ICMP) {
		if (ip->frag_off & bpf_htons(0x3fff))
			return TC_ACT_OK;
		return icmp4_error(skb, l4);
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return TC_ACT_OK;
	count(C_PACKETS);
	if (l4 > 60 + IP_OFF)
		return TC_ACT_OK;
	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__u16 sport, dport;
	__u8 tflags = 0;
	/* 0: not a fragment, 1: the first fragment, 2: a later one */
	int frag = 0;
	__u16 frag_off = bpf_ntohs(ip->frag_off);
	if (frag_off & 0x1fff)
		frag = 2;
	else if (frag_off & 0x2000)
		frag = 1;
	struct frag4_key fgk = {.saddr = saddr, .daddr = daddr, .id = ip->id, .proto = proto};
	if (frag == 2) {
		struct frag_ports *fp = bpf_map_lookup_elem(&svclb_frag4, &fgk);
		if (!fp) {
			count(C_PASS_FRAGMENT);
			return TC_ACT_OK;
		}
		sport = fp->sport;
		dport = fp->dport;
	} else {
		__u16 *ports = data + l4;
		if ((void *)(ports + 2) > end)
			return TC_ACT_OK;
		sport = ports[0];
		dport = ports[1];
		if (proto == IPPROTO_TCP) {
			struct tcphdr *tcp = data + l4;
			if ((void *)(tcp + 1) > end) {
				count(C_DROP_MALFORMED);
				return TC_ACT_SHOT;
			}
			tflags = ((__u8 *)tcp)[13];
		}
		if (frag == 1) {
			struct frag_ports fp = {.sport = sport, .dport = dport};
			bpf_map_update_elem(&svclb_frag4, &fgk, &fp, BPF_ANY);
		}
	}
	int has_l4 = frag != 2;
	__u64 now = bpf_ktime_get_ns();

	struct fe_key fk = {.vip = daddr, .port = dport, .proto = proto};
	struct fe_val *fe = bpf_map_lookup_elem(&svclb_frontends, &fk);
	if (!fe) {
		/* A reply from a backend? */
		struct rnat_key rk = {.saddr = saddr, .daddr = daddr, .sport = sport, .dport = dport,
				      .proto = proto};
		struct rnat_val *rn = bpf_map_lookup_elem(&svclb_rnat, &rk);
		if (!rn)
			return TC_ACT_OK;
		__u32 vip = rn->vip;
		__u16 vport = rn->vport;
		struct ct_key ck = {.saddr = daddr, .daddr = vip, .sport = dport, .dport = vport,
				    .proto = proto};
		struct ct_val *ct = bpf_map_lookup_elem(&svclb_ct, &ck);
		if (ct)
			ct_update(ct, proto, 1, tflags, now);
		if (rewrite(skb, l4, proto, 0, saddr, vip, sport, vport, has_l4) < 0) {
			count(C_DROP_MALFORMED);
			return TC_ACT_SHOT;
		}
		count(frag == 2 ? C_FRAGMENTS : C_REPLIES);
		return TC_ACT_OK;
	}

	struct ct_key ck = {.saddr = saddr, .daddr = daddr, .sport = sport, .dport = dport,
			    .proto = proto};
	int syn = (tflags & 0x12) == 0x02;
	struct be_val *be = 0;
	__u32 backend_id = 0;
	struct ct_val *ct = bpf_map_lookup_elem(&svclb_ct, &ck);
	if (ct && ct->expires > now && ct->fe_id == fe->id) {
		be = bpf_map_lookup_elem(&svclb_backends, &ct->backend_id);
		/* A SYN reopening a closed flow, or sent to a draining backend,
		 * is a new connection; other packets keep their backend. */
		if (be && syn && (be->state != BE_ACTIVE || ct->state >= CT_FIN))
			be = 0;
		if (be) {
			backend_id = ct->backend_id;
			count(frag == 2 ? C_FRAGMENTS : C_TRACKED);
		} else {
			count(C_RESCHEDULED);
		}
	}
	if (!be) {
		/* A later fragment follows its first one or nothing: it is
		 * never scheduled (or answered) on its own. */
		if (frag == 2) {
			count(C_PASS_FRAGMENT);
			return fe->count == 0 ? TC_ACT_SHOT : TC_ACT_OK;
		}
		if (fe->count == 0) {
			if (!(fe->flags & FE_REJECT_WHEN_EMPTY)) {
				count(C_DROP_LOCAL);
				return TC_ACT_SHOT;
			}
			if (proto == IPPROTO_TCP)
				return reject_tcp(skb, l4);
			return reject_udp(skb);
		}
		if (table_pick(fe, flow_hash(&ck), &backend_id) < 0) {
			count(C_DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		be = bpf_map_lookup_elem(&svclb_backends, &backend_id);
		if (!be) {
			count(C_DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		struct ct_val nct = {.backend_id = backend_id, .fe_id = fe->id,
				     .state = proto == IPPROTO_TCP ? CT_SYN : CT_UDP};
		ct_update(&nct, proto, 0, tflags, now);
		bpf_map_update_elem(&svclb_ct, &ck, &nct, BPF_ANY);
		struct rnat_key rk = {.saddr = be->addr, .daddr = saddr, .sport = be->port,
				      .dport = sport, .proto = proto};
		struct rnat_val rv = {.vip = daddr, .vport = dport};
		bpf_map_update_elem(&svclb_rnat, &rk, &rv, BPF_ANY);
		count(C_NEW);
	} else {
		ct_update(ct, proto, 0, tflags, now);
	}
	__u32 baddr = be->addr;
	__u16 bport = be->port;
	if (rewrite(skb, l4, proto, 1, daddr, baddr, dport, bport, has_l4) < 0) {
		count(C_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/* At most this many IPv6 extension headers (hop-by-hop, routing,
 * destination options, fragment) are skipped to reach TCP, UDP or ICMPv6,
 * in at most this many bytes; a packet with more passes untouched. */
#define MAX_EXTHDRS 4
#define MAX_EXTHDR_BYTES 256

struct frag6_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__u16 frag_off; /* offset in 8-byte units << 3, bit 0: more fragments */
	__u32 id;
};

/* handle4 for IPv6: TCP or UDP after the IPv6 header and up to
 * MAX_EXTHDRS extension headers, fragments as in handle4. */
static __always_inline int handle6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + IP_OFF;
	if ((void *)(ip6 + 1) > end)
		return TC_ACT_OK;
	__u8 proto = ip6->nexthdr;
	__u32 l4 = IP_OFF + sizeof(struct ipv6hdr);
	int frag = 0;
	__u32 frag_id = 0;
#pragma unroll
	for (int i = 0; i < MAX_EXTHDRS; i++) {
		if (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING ||
		    proto == IPPROTO_DSTOPTS) {
			__u8 h[2];
			if (bpf_skb_load_bytes(skb, l4, h, sizeof(h)) < 0)
				return TC_ACT_OK;
			proto = h[0];
			l4 += (h[1] + 1) * 8;
		} else if (proto == IPPROTO_FRAGMENT) {
			struct frag6_hdr fh;
			if (bpf_skb_load_bytes(skb, l4, &fh, sizeof(fh)) < 0)
				return TC_ACT_OK;
			proto = fh.nexthdr;
			l4 += sizeof(fh);
			frag_id = fh.id;
			__u16 fo = bpf_ntohs(fh.frag_off);
			if (fo & 0xfff8) {
				/* a later fragment: what follows is data, not
				 * headers (its next header is the first
				 * fragment's) */
				frag = 2;
				break;
			}
			if (fo & 1)
				frag = 1;
		} else {
			break;
		}
	}
	if (l4 > IP_OFF + sizeof(struct ipv6hdr) + MAX_EXTHDR_BYTES) {
		count(C_PASS_EXTHDR);
		return TC_ACT_OK;
	}
	if (proto == IPPROTO_ICMPV6) {
		if (frag)
			return TC_ACT_OK;
		return icmp6_error(skb, l4);
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
		if (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING ||
		    proto == IPPROTO_DSTOPTS || proto == IPPROTO_FRAGMENT)
			count(C_PASS_EXTHDR);
		return TC_ACT_OK;
	}
	count(C_PACKETS);
	/* The packet's own tuple: the client's for svclb_ct6, a backend's for
	 * svclb_rnat6. */
	struct ct6_key ck = {.proto = proto};
	__builtin_memcpy(ck.saddr, &ip6->saddr, 16);
	__builtin_memcpy(ck.daddr, &ip6->daddr, 16);
	__u8 tflags = 0;
	struct frag6_key fgk = {.id = frag_id, .proto = proto};
	__builtin_memcpy(fgk.saddr, ck.saddr, 16);
	__builtin_memcpy(fgk.daddr, ck.daddr, 16);
	if (frag == 2) {
		struct frag_ports *fp = bpf_map_lookup_elem(&svclb_frag6, &fgk);
		if (!fp) {
			count(C_PASS_FRAGMENT);
			return TC_ACT_OK;
		}
		ck.sport = fp->sport;
		ck.dport = fp->dport;
	} else {
		/* hide l4's bound from clang, which would drop the check the
		 * verifier needs for the variable packet offset */
		asm volatile("" : "+r"(l4));
		if (l4 > IP_OFF + sizeof(struct ipv6hdr) + MAX_EXTHDR_BYTES)
			return TC_ACT_OK;
		__u16 *ports = data + l4;
		if ((void *)(ports + 2) > end)
			return TC_ACT_OK;
		ck.sport = ports[0];
		ck.dport = ports[1];
		if (proto == IPPROTO_TCP) {
			struct tcphdr *tcp = data + l4;
			if ((void *)(tcp + 1) > end) {
				count(C_DROP_MALFORMED);
				return TC_ACT_SHOT;
			}
			tflags = ((__u8 *)tcp)[13];
		}
		if (frag == 1) {
			struct frag_ports fp = {.sport = ck.sport, .dport = ck.dport};
			bpf_map_update_elem(&svclb_frag6, &fgk, &fp, BPF_ANY);
		}
	}
	int has_l4 = frag != 2;
	__u16 sport = ck.sport, dport = ck.dport;
	__u64 now = bpf_ktime_get_ns();

	struct fe6_key fk = {.port = dport, .proto = proto};
	__builtin_memcpy(fk.vip, ck.daddr, 16);
	struct fe_val *fe = bpf_map_lookup_elem(&svclb_frontend6, &fk);
	if (!fe) {
		struct rnat6_val *rn = bpf_map_lookup_elem(&svclb_rnat6, &ck);
		if (!rn)
			return TC_ACT_OK;
		struct ct6_key cck = {.sport = dport, .dport = rn->vport, .proto = proto};
		__builtin_memcpy(cck.saddr, ck.daddr, 16);
		__builtin_memcpy(cck.daddr, rn->vip, 16);
		struct ct_val *ct = bpf_map_lookup_elem(&svclb_ct6, &cck);
		if (ct)
			ct_update(ct, proto, 1, tflags, now);
		if (rewrite6(skb, l4, proto, 0, ck.saddr, cck.daddr, sport, cck.dport, has_l4) < 0) {
			count(C_DROP_MALFORMED);
			return TC_ACT_SHOT;
		}
		count(frag == 2 ? C_FRAGMENTS : C_REPLIES);
		return TC_ACT_OK;
	}

	int syn = (tflags & 0x12) == 0x02;
	struct be6_val *be = 0;
	__u32 backend_id = 0;
	struct ct_val *ct = bpf_map_lookup_elem(&svclb_ct6, &ck);
	if (ct && ct->expires > now && ct->fe_id == fe->id) {
		be = bpf_map_lookup_elem(&svclb_backend6, &ct->backend_id);
		if (be && syn && (be->state != BE_ACTIVE || ct->state >= CT_FIN))
			be = 0;
		if (be) {
			backend_id = ct->backend_id;
			count(frag == 2 ? C_FRAGMENTS : C_TRACKED);
		} else {
			count(C_RESCHEDULED);
		}
	}
	if (!be) {
		if (frag == 2) {
			count(C_PASS_FRAGMENT);
			return fe->count == 0 ? TC_ACT_SHOT : TC_ACT_OK;
		}
		if (fe->count == 0) {
			if (!(fe->flags & FE_REJECT_WHEN_EMPTY)) {
				count(C_DROP_LOCAL);
				return TC_ACT_SHOT;
			}
			/* The RST and the ICMPv6 error are built for a packet
			 * without extension headers; one with them is dropped. */
			if (l4 != IP_OFF + sizeof(struct ipv6hdr)) {
				count(C_DROP_LOCAL);
				return TC_ACT_SHOT;
			}
			if (proto == IPPROTO_TCP)
				return reject_tcp6(skb, l4);
			return reject_udp6(skb);
		}
		if (table_pick(fe, flow_hash6(&ck), &backend_id) < 0) {
			count(C_DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		be = bpf_map_lookup_elem(&svclb_backend6, &backend_id);
		if (!be) {
			count(C_DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		struct ct_val nct = {.backend_id = backend_id, .fe_id = fe->id,
				     .state = proto == IPPROTO_TCP ? CT_SYN : CT_UDP};
		ct_update(&nct, proto, 0, tflags, now);
		bpf_map_update_elem(&svclb_ct6, &ck, &nct, BPF_ANY);
		struct ct6_key rk = {.sport = be->port, .dport = sport, .proto = proto};
		__builtin_memcpy(rk.saddr, be->addr, 16);
		__builtin_memcpy(rk.daddr, ck.saddr, 16);
		struct rnat6_val rv = {.vport = dport};
		__builtin_memcpy(rv.vip, ck.daddr, 16);
		bpf_map_update_elem(&svclb_rnat6, &rk, &rv, BPF_ANY);
		count(C_NEW);
	} else {
		ct_update(ct, proto, 0, tflags, now);
	}
	__u32 baddr[4];
	__builtin_memcpy(baddr, be->addr, 16);
	__u16 bport = be->port;
	if (rewrite6(skb, l4, proto, 1, ck.daddr, baddr, dport, bport, has_l4) < 0) {
		count(C_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}
SEC("classifier")
int svclb_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return handle4(skb);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return handle6(skb);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
