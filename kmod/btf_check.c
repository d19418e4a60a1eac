// SPDX-License-Identifier: GPL-2.0
/*
 * The load-time layout check: the members of KVM's structures that the
 * module reads (directly, or through kvm_host.h's inline helpers) must lie
 * where the running kernel's BTF says they do. KVM's struct kvm,
 * kvm_memslots and kvm_memory_slot are described in vmlinux's BTF (kvm.ko's
 * split BTF only adds what vmlinux lacks), which the kernel exports at
 * /sys/kernel/btf/vmlinux. A member that is missing or elsewhere refuses
 * the load with its name and both offsets.
 */
#include <linux/kernel_read_file.h>
#include <linux/kvm_host.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/vmalloc.h>
#include <uapi/linux/btf.h>

#include "internal.h"

static bool btf_check = true;
module_param(btf_check, bool, 0444);
MODULE_PARM_DESC(btf_check,
		 "Check the layout of KVM's structures against the running kernel's BTF at load (0: rely on module versioning alone)");

/*
 * The layout check's own test builds the module with this set to a byte
 * count: struct kvm's slots_lock then seems to lie that much further, as in
 * a module built against other headers, and the load must be refused.
 */
#ifndef VMSYNC_TEST_LAYOUT_SKEW
#define VMSYNC_TEST_LAYOUT_SKEW 0
#endif

struct vmsync_layout_member {
	const char *type;	/* struct name */
	const char *member;
	u32 offset;		/* bytes, as this build lays it out */
};

#define VMSYNC_MEMBER(t, m) { #t, #m, offsetof(struct t, m) }

static const struct vmsync_layout_member vmsync_layout[] = {
	VMSYNC_MEMBER(kvm, mm),
	{ "kvm", "slots_lock",
	  offsetof(struct kvm, slots_lock) + VMSYNC_TEST_LAYOUT_SKEW },
	VMSYNC_MEMBER(kvm, memslots),
	VMSYNC_MEMBER(kvm, dirty_ring_size),
	VMSYNC_MEMBER(kvm, manual_dirty_log_protect),
	VMSYNC_MEMBER(kvm_memslots, generation),
	VMSYNC_MEMBER(kvm_memslots, gfn_tree),
	VMSYNC_MEMBER(kvm_memslots, id_hash),
	VMSYNC_MEMBER(kvm_memslots, node_idx),
	VMSYNC_MEMBER(kvm_memory_slot, gfn_node),
	VMSYNC_MEMBER(kvm_memory_slot, id_node),
	VMSYNC_MEMBER(kvm_memory_slot, base_gfn),
	VMSYNC_MEMBER(kvm_memory_slot, npages),
	VMSYNC_MEMBER(kvm_memory_slot, flags),
	VMSYNC_MEMBER(kvm_memory_slot, userspace_addr),
	VMSYNC_MEMBER(kvm_memory_slot, as_id),
	VMSYNC_MEMBER(kvm_memory_slot, id),
};

/* One BTF blob, checked against its own bounds, with an index of its types. */
struct vmsync_btf {
	const u8 *types;	/* type section */
	u32 types_len;
	const char *strings;
	u32 strings_len;
	u32 *offset_of;		/* type id -> offset in @types; id 0 is void */
	u32 nr_types;
};

/* Bytes that follow a btf_type of this kind; -1 for a kind it does not know. */
static long vmsync_btf_extra(const struct btf_type *t)
{
	u32 vlen = BTF_INFO_VLEN(t->info);

	switch (BTF_INFO_KIND(t->info)) {
	case BTF_KIND_INT:
		return sizeof(u32);
	case BTF_KIND_ARRAY:
		return sizeof(struct btf_array);
	case BTF_KIND_STRUCT:
	case BTF_KIND_UNION:
		return (long)vlen * sizeof(struct btf_member);
	case BTF_KIND_ENUM:
		return (long)vlen * sizeof(struct btf_enum);
	case BTF_KIND_FUNC_PROTO:
		return (long)vlen * sizeof(struct btf_param);
	case BTF_KIND_VAR:
		return sizeof(struct btf_var);
	case BTF_KIND_DATASEC:
		return (long)vlen * sizeof(struct btf_var_secinfo);
	case BTF_KIND_DECL_TAG:
		return sizeof(struct btf_decl_tag);
	case BTF_KIND_ENUM64:
		return (long)vlen * sizeof(struct btf_enum64);
	case BTF_KIND_PTR:
	case BTF_KIND_FWD:
	case BTF_KIND_TYPEDEF:
	case BTF_KIND_VOLATILE:
	case BTF_KIND_CONST:
	case BTF_KIND_RESTRICT:
	case BTF_KIND_FUNC:
	case BTF_KIND_FLOAT:
	case BTF_KIND_TYPE_TAG:
		return 0;
	default:
		return -1;
	}
}

/* Walks the type section once to count, once to index. */
static int vmsync_btf_index(struct vmsync_btf *btf)
{
	u32 pass, pos, n;

	for (pass = 0; pass < 2; pass++) {
		for (pos = 0, n = 0; pos < btf->types_len; n++) {
			const struct btf_type *t;
			long extra;

			if (btf->types_len - pos < sizeof(*t))
				return -EINVAL;
			t = (const struct btf_type *)(btf->types + pos);
			extra = vmsync_btf_extra(t);
			if (extra < 0) {
				pr_err("vmsync: this kernel's BTF has a type of kind %u, unknown to the module\n",
				       BTF_INFO_KIND(t->info));
				return -EINVAL;
			}
			if (btf->types_len - pos - sizeof(*t) < extra)
				return -EINVAL;
			if (pass == 1)
				btf->offset_of[n + 1] = pos;
			pos += sizeof(*t) + extra;
		}
		if (pass == 0) {
			btf->nr_types = n;
			btf->offset_of = kvmalloc_array(n + 1, sizeof(u32),
							GFP_KERNEL);
			if (!btf->offset_of)
				return -ENOMEM;
		}
	}
	return 0;
}

/* The string at @off, or NULL when it does not end inside the section. */
static const char *vmsync_btf_name(const struct vmsync_btf *btf, u32 off)
{
	if (off >= btf->strings_len ||
	    strnlen(btf->strings + off, btf->strings_len - off) ==
		    btf->strings_len - off)
		return NULL;
	return btf->strings + off;
}

static const struct btf_type *vmsync_btf_type(const struct vmsync_btf *btf,
					      u32 id)
{
	if (id == 0 || id > btf->nr_types)
		return NULL;
	return (const struct btf_type *)(btf->types + btf->offset_of[id]);
}

static bool vmsync_btf_is_aggregate(const struct btf_type *t)
{
	return BTF_INFO_KIND(t->info) == BTF_KIND_STRUCT ||
	       BTF_INFO_KIND(t->info) == BTF_KIND_UNION;
}

/*
 * The byte offset of member @name in aggregate @t, looking into anonymous
 * structs and unions as C does; -ENOENT when it has none, -EINVAL for a
 * bitfield or a bit offset that is not a whole byte.
 */
static long vmsync_btf_member(const struct vmsync_btf *btf,
			      const struct btf_type *t, const char *name,
			      int depth)
{
	const struct btf_member *m = (const struct btf_member *)(t + 1);
	bool kflag = BTF_INFO_KFLAG(t->info);
	u32 i, vlen = BTF_INFO_VLEN(t->info);

	if (depth > 8)
		return -ENOENT;
	for (i = 0; i < vlen; i++, m++) {
		u32 bits = kflag ? BTF_MEMBER_BIT_OFFSET(m->offset) : m->offset;
		const char *mname = vmsync_btf_name(btf, m->name_off);

		if (!mname)
			return -EINVAL;
		if (mname[0] == '\0') {
			const struct btf_type *inner = vmsync_btf_type(btf, m->type);
			long off;

			if (!inner || !vmsync_btf_is_aggregate(inner))
				continue;
			off = vmsync_btf_member(btf, inner, name, depth + 1);
			if (off == -ENOENT)
				continue;
			return off < 0 ? off : off + bits / 8;
		}
		if (strcmp(mname, name) != 0)
			continue;
		if (bits % 8 || (kflag && BTF_MEMBER_BITFIELD_SIZE(m->offset)))
			return -EINVAL;
		return bits / 8;
	}
	return -ENOENT;
}

/* The struct called @name, or NULL. */
static const struct btf_type *vmsync_btf_struct(const struct vmsync_btf *btf,
						const char *name)
{
	u32 id;

	for (id = 1; id <= btf->nr_types; id++) {
		const struct btf_type *t = vmsync_btf_type(btf, id);
		const char *tname;

		if (BTF_INFO_KIND(t->info) != BTF_KIND_STRUCT || !t->name_off)
			continue;
		tname = vmsync_btf_name(btf, t->name_off);
		if (tname && strcmp(tname, name) == 0 && BTF_INFO_VLEN(t->info))
			return t;
	}
	return NULL;
}

static int vmsync_btf_compare(const struct vmsync_btf *btf)
{
	const struct btf_type *t = NULL;
	const char *in_struct = NULL;
	size_t i;

	for (i = 0; i < ARRAY_SIZE(vmsync_layout); i++) {
		const struct vmsync_layout_member *f = &vmsync_layout[i];
		long off;

		if (!in_struct || strcmp(in_struct, f->type) != 0) {
			in_struct = f->type;
			t = vmsync_btf_struct(btf, f->type);
			if (!t) {
				pr_err("vmsync: struct %s is not in this kernel's BTF; the module reads it and cannot check its layout\n",
				       f->type);
				return -ENOEXEC;
			}
		}
		off = vmsync_btf_member(btf, t, f->member, 0);
		if (off == -ENOENT) {
			pr_err("vmsync: this kernel's struct %s has no member %s, which the module reads: build the module against this kernel's headers\n",
			       f->type, f->member);
			return -ENOEXEC;
		}
		if (off < 0) {
			pr_err("vmsync: this kernel's BTF gives struct %s member %s no byte offset\n",
			       f->type, f->member);
			return -ENOEXEC;
		}
		if (off != f->offset) {
			pr_err("vmsync: struct %s member %s is at byte %ld in this kernel (BTF) but at byte %u in the headers the module was built against: build it against this kernel's headers\n",
			       f->type, f->member, off, f->offset);
			return -ENOEXEC;
		}
	}
	return 0;
}

int vmsync_check_layout(void)
{
	static const char path[] = "/sys/kernel/btf/vmlinux";
	const struct btf_header *hdr;
	struct vmsync_btf btf = {};
	void *blob = NULL;
	size_t size = 0;
	ssize_t got;
	int err;

	if (!btf_check) {
		pr_warn("vmsync: layout of KVM's structures not checked (btf_check=0): module versioning alone stands behind it\n");
		return 0;
	}
	got = kernel_read_file_from_path(path, 0, &blob, INT_MAX, &size,
					 READING_UNKNOWN);
	if (got < 0) {
		pr_err("vmsync: cannot read %s (error %zd) to check the layout of KVM's structures; a kernel without BTF (CONFIG_DEBUG_INFO_BTF) needs btf_check=0\n",
		       path, got);
		return (int)got;
	}
	err = -ENOEXEC;
	hdr = blob;
	if ((size_t)got < sizeof(*hdr) || hdr->magic != BTF_MAGIC ||
	    hdr->hdr_len < sizeof(*hdr) || hdr->hdr_len > got ||
	    hdr->type_off > got - hdr->hdr_len ||
	    hdr->type_len > got - hdr->hdr_len - hdr->type_off ||
	    hdr->str_off > got - hdr->hdr_len ||
	    hdr->str_len > got - hdr->hdr_len - hdr->str_off) {
		pr_err("vmsync: %s is not a BTF blob the module can read\n", path);
		goto out;
	}
	btf.types = (const u8 *)blob + hdr->hdr_len + hdr->type_off;
	btf.types_len = hdr->type_len;
	btf.strings = (const char *)blob + hdr->hdr_len + hdr->str_off;
	btf.strings_len = hdr->str_len;
	err = vmsync_btf_index(&btf);
	if (err) {
		if (err == -EINVAL)
			pr_err("vmsync: the type section of %s is cut short or holds a kind the module does not know\n",
			       path);
		err = err == -ENOMEM ? err : -ENOEXEC;
		goto out;
	}
	err = vmsync_btf_compare(&btf);
	if (!err)
		pr_info("vmsync: the %zu members of struct kvm, kvm_memslots and kvm_memory_slot the module reads are where this kernel's BTF puts them\n",
			ARRAY_SIZE(vmsync_layout));
out:
	kvfree(btf.offset_of);
	vfree(blob);
	return err;
}
