// Runs a server binary as a child process on 127.0.0.1 port 0 and reads the port it chose from
// its "... listening on 127.0.0.1:PORT" line. The destructor stops it (SIGTERM, then SIGKILL).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace duet::testing {

class ServerProcess {
 public:
  ServerProcess(const std::string& binary, std::vector<std::string> args) {
    // Servers serve /metrics on a fixed default port; tests run in parallel, so give each a
    // free one unless the test chose.
    bool metrics_flag = false, metrics_on = true;
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i].rfind("--metrics-listen", 0) != 0) continue;
      metrics_flag = true;
      const std::string v = args[i] == "--metrics-listen" && i + 1 < args.size()
                                ? args[i + 1]
                                : args[i].substr(args[i].find('=') + 1);
      metrics_on = v != "off" && !v.empty();
    }
    if (!metrics_flag) {
      args.push_back("--metrics-listen");
      args.push_back("127.0.0.1:0");
    }
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe");
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 1);
      close(out[0]);
      close(out[1]);
      std::vector<char*> argv;
      argv.push_back(const_cast<char*>(binary.c_str()));
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(binary.c_str(), argv.data());
      _exit(127);
    }
    close(out[1]);
    out_ = out[0];
    // Wait up to 60 s for the listening line.
    std::string buf;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < until) {
      pollfd p{out_, POLLIN, 0};
      if (poll(&p, 1, 100) > 0) {
        char c[256];
        const ssize_t n = read(out_, c, sizeof c);
        if (n <= 0) break;
        buf.append(c, n);
        const auto pos = buf.find("listening on ");
        const auto nl = buf.find('\n', pos == std::string::npos ? 0 : pos);
        if (address_.empty() && pos != std::string::npos && nl != std::string::npos) {
          address_ = buf.substr(pos + 13, nl - pos - 13);
          port_ = std::stoi(address_.substr(address_.rfind(':') + 1));
          if (!metrics_on) return;
        }
        // Then "... metrics on http://HOST:PORT/metrics", unless metrics are off.
        const auto m = buf.find("metrics on http://");
        const auto mnl = buf.find('\n', m == std::string::npos ? 0 : m);
        if (!address_.empty() && m != std::string::npos && mnl != std::string::npos) {
          metrics_address_ = buf.substr(m + 18, mnl - m - 18);
          metrics_address_ = metrics_address_.substr(0, metrics_address_.find('/'));
          return;
        }
      }
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
    }
    throw std::runtime_error(binary + " did not start: " + buf);
  }
  ~ServerProcess() { Stop(); }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  const std::string& address() const { return address_; }
  // HOST:PORT of its /metrics, empty when metrics are off.
  const std::string& metrics_address() const { return metrics_address_; }
  int port() const { return port_; }
  pid_t pid() const { return pid_; }

  // SIGTERM and wait (SIGKILL after `grace`); returns the exit status (-1 if killed/unknown).
  int Stop(std::chrono::milliseconds grace = std::chrono::milliseconds(5000)) {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    return Wait(grace);
  }
  // Sends a signal and returns at once.
  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }
  // True while the process has not exited (reaps it when it has; see exit_code()).
  bool Running() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) != pid_) return true;
    pid_ = -1;
    close(out_);
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return false;
  }
  int exit_code() const { return exit_code_; }
  // Waits for the exit (SIGKILL after `grace`); returns the exit status (-1 if killed/unknown).
  int Wait(std::chrono::milliseconds grace) {
    if (pid_ <= 0) return exit_code_;
    const auto until = std::chrono::steady_clock::now() + grace;
    int status = 0;
    while (std::chrono::steady_clock::now() < until) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        close(out_);
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        return exit_code_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    Kill();
    return -1;
  }
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
    close(out_);
  }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  std::string address_;
  std::string metrics_address_;
  int port_ = 0;
  int exit_code_ = -1;
};

}  // namespace duet::testing
