// duet-prefill: serves duet.v1.PrefillService (see flags.h for the configuration).
// Prints "duet-prefill listening on HOST:PORT" on stdout once it serves; SIGTERM or SIGINT set
// health NOT_SERVING, let running streams finish for --drain-s seconds, and exit 0.
// Anything that stops it from starting (a bad flag, a model that does not load, an address that
// cannot be bound) exits 2 with one line on stderr.
#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "duet/kernels/threads.h"
#include "duet/prefill/flags.h"
#include "duet/prefill/server.h"
#include "duet/tensor/malloc_tuning.h"

int main(int argc, char** argv) {
  duet::KeepFreedMemory();
  auto flags = duet::prefill::ParseFlags(
      argc, argv, [](const char* name) { return static_cast<const char*>(std::getenv(name)); });
  if (!flags.ok()) {
    std::fprintf(stderr, "duet-prefill: %s\n", std::string(flags.status().message()).c_str());
    return 2;
  }
  if (flags->help) {
    std::fputs(duet::prefill::Usage().c_str(), stdout);
    return 0;
  }

  // Every thread started from here on inherits the blocked set; the main thread takes the
  // signals with sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // Model loading runs kernels on this thread; the engine sets its own thread's count.
  duet::kernels::SetNumThreads(flags->server.engine.n_threads);
  auto server = duet::prefill::PrefillServer::Start(flags->server);
  if (!server.ok()) {
    std::fprintf(stderr, "duet-prefill: %s\n", server.status().ToString().c_str());
    return 2;
  }
  std::printf("duet-prefill listening on %s\n", (*server)->address().c_str());
  if (const std::string m = (*server)->metrics_address(); !m.empty())
    std::printf("duet-prefill metrics on http://%s/metrics\n", m.c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "duet-prefill: model %s (%s), max context %d, max queue %d\n",
               (*server)->model_name().c_str(), (*server)->engine().model().fingerprint().c_str(),
               (*server)->engine().max_context(), (*server)->engine().options().max_queue);

  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "duet-prefill: %s, shutting down\n", strsignal(sig));
  (*server)->Shutdown(flags->drain);
  server->reset();
  return 0;
}
