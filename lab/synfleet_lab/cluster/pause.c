/* The pod sandbox's process: holds the pod's namespaces and does nothing.
 * The lab cluster cannot pull registry.k8s.io/pause, so it builds this one
 * (statically linked, in an image of its own). As PID 1 of its PID namespace
 * it must reap orphans and end on SIGINT/SIGTERM, which PID 1 does not get
 * by default. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { _exit(128 + sig); }

static void reap(int sig)
{
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(void)
{
	struct sigaction quit = {.sa_handler = stop};
	struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};

	if (sigaction(SIGINT, &quit, NULL) || sigaction(SIGTERM, &quit, NULL) ||
	    sigaction(SIGCHLD, &child, NULL))
		return 1;
	for (;;)
		pause();
}
