// pm2 side of the side-by-side benchmark. Runs with the machine's node; loads pm2 from
// the scratch folder (PM2_MODULE) and talks to its God daemon (started by pm2.connect in
// PM2_HOME, unix sockets only) through pm2's own programmatic API — the calls behind
// `pm2 start`, `pm2 jlist`, `pm2 stop`, `pm2 kill`. Same JSON-lines protocol on
// stdin/stdout as agent_shipyard.py. pm2 prints to stdout: console output goes to stderr.
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');

const out = process.stdout.write.bind(process.stdout);
console.log = (...args) => process.stderr.write(args.join(' ') + '\n');
console.info = console.log;
console.warn = console.log;
console.error = console.log;

const pm2 = require(process.env.PM2_MODULE);

let cfg = null;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const call = (fn, ...args) => new Promise((resolve, reject) => {
  fn.call(pm2, ...args, (err, res) => (err ? reject(err) : resolve(res)));
});

// name -> pid of the processes pm2 reports online (`pm2 jlist` is the same call)
async function running() {
  const list = await call(pm2.list);
  const pids = {};
  for (const p of list) {
    if (p.pm2_env && p.pm2_env.status === 'online' && p.pid) pids[p.name] = p.pid;
  }
  return pids;
}

const ops = {
  async setup(req) {
    cfg = req;
    await call(pm2.connect);
    const pidFile = path.join(process.env.PM2_HOME, 'pm2.pid');
    return { control_pids: [parseInt(fs.readFileSync(pidFile, 'utf8'), 10)] };
  },
  async start() {
    const apps = [];
    for (let i = 0; i < cfg.n; i++) {
      apps.push({
        name: `g_${String(i).padStart(3, '0')}`,
        script: cfg.argv[0],
        args: cfg.argv.slice(1),
        interpreter: 'none',
        exec_mode: 'fork',
        cwd: cfg.run_dir,
        autorestart: true,
        restart_delay: 0,
        max_restarts: 100000,
        kill_timeout: 10000,
        kill_retry_time: 10, // how often a stop checks the process is gone (default 100 ms)
        vizion: false,
        watch: false,
      });
    }
    await call(pm2.start, { apps });
    while (Object.keys(await running()).length < cfg.n) await sleep(cfg.poll * 1000);
    return {};
  },
  async pids() {
    return { pids: await running() };
  },
  async wait_new(req) {
    const deadline = Date.now() + req.timeout * 1000;
    while (Date.now() < deadline) {
      const pid = (await running())[req.name];
      if (pid !== undefined && pid !== req.old) return { pid };
      await sleep(cfg.poll * 1000);
    }
    throw new Error(`no new pid for ${req.name}`);
  },
  async stop() {
    await call(pm2.stop, 'all');
    while (Object.keys(await running()).length > 0) await sleep(cfg.poll * 1000);
    return {};
  },
  async quit() {
    if (cfg !== null) {
      try {
        await call(pm2.killDaemon);
      } catch (err) {
        console.log(`pm2 kill: ${err}`);
      }
      pm2.disconnect();
    }
    return {};
  },
};

async function main() {
  const rl = readline.createInterface({ input: process.stdin });
  let quitted = false;
  for await (const line of rl) {
    const req = JSON.parse(line);
    let reply;
    try {
      reply = await ops[req.op](req);
      reply.ok = true;
    } catch (err) {
      reply = { ok: false, error: String(err && err.stack ? err.stack : err) };
    }
    out(JSON.stringify(reply) + '\n');
    if (req.op === 'quit') {
      quitted = true;
      break;
    }
  }
  if (!quitted) await ops.quit();
  process.exit(0);
}

main();
