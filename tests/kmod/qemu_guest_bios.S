/*
 * A 64 KiB "BIOS" for QEMU, the guest of kmod_qemu_check.  In real mode,
 * round after round, it writes a round counter (%bl) into the first byte of
 * every even page from 0x10000 up to 0x90000 (64 pages); the odd pages
 * there are never written.  After each round it looks at a mailbox byte at
 * 0x9000 that the controller writes into the RAM file: when it changed, the
 * guest flips PAM1 (0xc0000-0xc7fff) between "not RAM" and "RAM, read and
 * write" through the q35 host bridge's config space, so QEMU rebuilds its
 * KVM memory slots; while PAM1 is RAM it writes the counter at 0xc0000 too.
 * Built with as + objcopy -O binary by run_kmod_test.sh.
 */
	.code16
	.text
start:				/* 0xf0000: the reset vector jumps here */
	cli
	xor	%bl, %bl	/* round counter */
	xor	%cx, %cx	/* %cl: mailbox last seen, %ch: PAM1 value */
round:
	inc	%bl
	mov	$0x1000, %ax
page:
	mov	%ax, %es
	movb	%bl, %es:0
	add	$0x200, %ax
	cmp	$0x9000, %ax
	jb	page

	mov	$0x0900, %ax	/* the mailbox at 0x9000 */
	mov	%ax, %es
	movb	%es:0, %al
	cmp	%al, %cl
	je	pam_written
	mov	%al, %cl
	xor	$0x33, %ch
	mov	$0x80000090, %eax	/* bus 0, device 0, function 0, register 0x90 */
	mov	$0xcf8, %dx
	outl	%eax, %dx
	mov	$0xcfd, %dx		/* byte 0x91: PAM1 */
	mov	%ch, %al
	outb	%al, %dx
pam_written:
	test	%ch, %ch
	jz	round
	mov	$0xc000, %ax
	mov	%ax, %es
	movb	%bl, %es:0
	jmp	round

	.org	0xfff0		/* the reset vector, 16 bytes below 4 GiB */
reset:
	ljmp	$0xf000, $start
	.org	0x10000
