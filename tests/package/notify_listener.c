/*
 * The systemd side of sd_notify(3) for the package test: binds a datagram
 * socket at SOCKET and appends each message received there to FILE, one
 * message a line (the newlines inside a message become spaces), until
 * SIGTERM. A daemon started with NOTIFY_SOCKET=SOCKET then tells the test
 * what it would tell systemd: READY=1, STOPPING=1, WATCHDOG=1.
 *
 *   notify_listener SOCKET FILE
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_un address = { .sun_family = AF_UNIX };
	char message[4096];
	FILE *out;
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: %s SOCKET FILE\n", argv[0]);
		return 2;
	}
	if (strlen(argv[1]) >= sizeof(address.sun_path)) {
		fprintf(stderr, "notify_listener: socket path %s is too long\n", argv[1]);
		return 2;
	}
	strcpy(address.sun_path, argv[1]);
	out = fopen(argv[2], "a");
	if (!out) {
		fprintf(stderr, "notify_listener: cannot open %s: %s\n", argv[2], strerror(errno));
		return 1;
	}
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	unlink(argv[1]);
	if (fd < 0 || bind(fd, (struct sockaddr *)&address, sizeof(address)) != 0) {
		fprintf(stderr, "notify_listener: cannot bind %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	signal(SIGTERM, SIG_DFL);
	for (;;) {
		ssize_t n = recv(fd, message, sizeof(message) - 1, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "notify_listener: recv: %s\n", strerror(errno));
			return 1;
		}
		for (ssize_t i = 0; i < n; i++)
			if (message[i] == '\n' || message[i] == '\0')
				message[i] = ' ';
		message[n] = '\0';
		fprintf(out, "%s\n", message);
		fflush(out);
	}
}
