"""The notifier: chosen events (rollouts done or failed, crash loops, failed pipeline runs,
approvals needed, rules' notify actions) posted to Slack or Mattermost incoming webhooks,
rate limited so that a storm becomes a summary, not a flood."""
