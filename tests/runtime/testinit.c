/* PID 1 of the runtime tests' guest: a stand-in for the real uniframe init.
 *
 * Prints UNIFRAME-TEST-READY, serves HTTP on $UF_PORT (a kernel command line
 * key=value reaches init's environment), and exits the way the real init
 * does: on "uniframe:shutdown" read from the console with status 0, on
 * "GET /exit/N" with status N; either way it prints UNIFRAME-EXIT status=N
 * and reboots (reboot=t + QEMU -no-reboot end the VM). UF_IGNORE_SHUTDOWN=1
 * makes it a guest that ignores stop requests (to test QMP quit and SIGKILL).
 */
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <unistd.h>

static void finish(int status) {
    printf("UNIFRAME-EXIT status=%d\n", status);
    fflush(stdout);
    sync();
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

int main(void) {
    const char *port_env = getenv("UF_PORT");
    int ignore_shutdown = getenv("UF_IGNORE_SHUTDOWN") != NULL;
    int port = port_env ? atoi(port_env) : 8080;
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 16)) {
        perror("listen");
        finish(3);
    }
    printf("UNIFRAME-TEST-READY port=%d\n", port);
    fflush(stdout);
    char line[256];
    size_t used = 0;
    struct pollfd fds[2] = {{.fd = 0, .events = POLLIN}, {.fd = lfd, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) continue;
        if (fds[0].revents & POLLIN) {
            ssize_t n = read(0, line + used, sizeof line - 1 - used);
            if (n > 0) {
                used += n;
                line[used] = 0;
                if (strstr(line, "uniframe:shutdown") && !ignore_shutdown) finish(0);
                if (strchr(line, '\n') || used == sizeof line - 1) used = 0;
            }
        }
        if (fds[1].revents & POLLIN) {
            int c = accept(lfd, NULL, NULL);
            if (c < 0) continue;
            char req[1024] = {0};
            ssize_t n = read(c, req, sizeof req - 1);
            int code = -1;
            if (n > 0 && sscanf(req, "GET /exit/%d", &code) == 1) {
                const char *bye = "HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nbye\n";
                write(c, bye, strlen(bye));
                close(c);
                finish(code);
            }
            const char *ok = "HTTP/1.0 200 OK\r\nContent-Length: 26\r\n\r\nhello from the test guest\n";
            write(c, ok, strlen(ok));
            close(c);
        }
    }
}
